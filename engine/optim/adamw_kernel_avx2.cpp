#define MMOC_OPTIM_ISA_NS isa_avx2
#include "engine/optim/adamw_kernels.inc"
