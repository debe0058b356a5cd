"""The README's Python snippets run as printed (the model path swapped for a built-in tiny model)."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(section: str) -> str:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", body, re.S)
    return code


def _run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    return out.getvalue()


def test_ten_lines_of_python():
    code = _snippet("Ten lines of Python")
    assert code.count('"path/to/hf_dir_or_stories15M.bin"') == 1
    out = _run(code.replace('"path/to/hf_dir_or_stories15M.bin"', '"tiny:llama"'))
    assert re.search(r"ErrorStats\(.*bound_ratio=", out), out       # assert_within's stats, printed


def test_timing_your_own_kernel():
    out = _run(_snippet("Timing your own kernel"))                   # no time is judged: it runs and reports
    assert re.search(r"^\d+ ticks/call, ~\d+ core cycles, CV \d", out, re.M) and "Roofline(" in out, out
