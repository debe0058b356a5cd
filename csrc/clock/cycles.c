#include "clock.h"
#include "_tsc.h"

const char *rf_counter_name(void) { return RF_COUNTER; }
uint64_t rf_ticks_start(void) { return rf__start(); }
uint64_t rf_ticks_stop(int32_t *cpu) { return rf__stop(cpu); }
