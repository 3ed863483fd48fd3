#!/usr/bin/env bash
# Compile-checks every CUDA source (.cu) under csrc/ for sm_80 and sm_90,
# with warnings as errors, into a temporary folder. Exits 0 with
# "nvcc not found: skipped" where there is no nvcc.
#
# Usage: scripts/check_cuda.sh [--out DIR]   (--out keeps the objects in DIR)
# Environment: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc).
set -euo pipefail

keep=""
if [[ "${1:-}" == "--out" ]]; then
  keep="${2:?--out needs a folder}"
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$nvcc" ]] || ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "nvcc not found: skipped"
  exit 0
fi

mapfile -t sources < <(cd "$root" && find csrc -name '*.cu' | LC_ALL=C sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "no .cu files under csrc/" >&2
  exit 1
fi

if [[ -n "$keep" ]]; then
  mkdir -p "$keep"
  out="$(cd "$keep" && pwd)"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi

# Warnings as errors: nvcc's front end, the device compiler and ptxas
# (-Werror all-warnings) and the host compiler (-Xcompiler -Werror). Spill
# warnings are not asked for: a 64-bit integer division outside the loops is
# a subroutine call whose few spilled bytes are harmless (see the counts with
# -Xptxas -v).
flags=(
  -c -std=c++17 -I"$root/csrc/include"
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Werror all-warnings
  -Xcompiler -Wall,-Wextra,-Wno-unused-parameter,-Werror
  # as torch.utils.cpp_extension compiles them: no implicit half / bfloat16
  # operators or conversions
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
)

echo "nvcc: $("$nvcc" --version | tail -n 1)"
echo "command: $nvcc ${flags[*]} <source> -o <object>"
status=0
for src in "${sources[@]}"; do
  obj="$out/$(echo "$src" | tr '/' '_').o"
  start=$SECONDS
  if "$nvcc" "${flags[@]}" "$root/$src" -o "$obj"; then
    echo "ok      $src ($((SECONDS - start)) s)"
  else
    echo "FAILED  $src" >&2
    status=1
  fi
done
echo "checked ${#sources[@]} file(s): ${sources[*]}"
exit $status
