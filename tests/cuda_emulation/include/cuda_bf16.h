// Emulation shim (tests/cuda_emulation): the CUDA header cuda_bf16.h, on CPU threads.
#pragma once
#include "../cuda_emu.h"
