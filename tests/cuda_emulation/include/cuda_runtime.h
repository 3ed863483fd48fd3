// Emulation shim (tests/cuda_emulation): the CUDA header cuda_runtime.h, on CPU threads.
#pragma once
#include "../cuda_emu.h"
