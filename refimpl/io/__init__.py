"""Checkpoints and tokenizers in, `Model` out (no pickle, ever).

    safetensors.py  hand-written safe reader/writer: load_file, save_file, load (with metadata)
    hf.py           HF model directory (config.json + safetensors, sharded or not) -> (Config, params)
    llama2c.py      llama2.c .bin v0/v1 reader and writer (save_llama2c)
    pickles.py      recognise PyTorch zip/pickle checkpoints (refused, never unpickled)
    tokenizers.py   bytes, llama2.c tokenizer.bin (run.c BPE), HF tokenizer.json; load_tokenizer
    load.py         load(path, dtype, backend) -> Model   (re-exported as refimpl.load)
    cli.py          `refimpl generate`
"""
