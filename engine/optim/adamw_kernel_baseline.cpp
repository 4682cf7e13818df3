#define MMOC_OPTIM_ISA_NS isa_baseline
#include "engine/optim/adamw_kernels.inc"
