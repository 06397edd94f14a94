// kd_grad_cache.h -- reuse of CPU gradient buffers across calls.
//
// Every training step asks for a fresh N x V gradient. A fresh buffer of that size comes from the
// kernel as untouched pages: each first touch is a page fault and a page of zeroing, which measured
// here cost more than the whole kernel (a 262 MB gradient: ~75 ms of faults and zeroing against
// ~20 ms to write it). Like PyTorch's CUDA caching allocator, the CPU op keeps freed gradient
// buffers and hands them out again when a gradient of the same size is asked for, so a training
// loop pays for the pages once. Bounded by what the loop uses: only buffers of the last requested
// size, no more than were in use at once (kd_grad_cache.cpp). KDFUSED_CPU_GRAD_CACHE=0 turns this
// off; kdfused.empty_cache() returns the cached buffers to the system.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace kdfused::cpu {

// An uninitialised contiguous tensor of the given shape and options (CPU), from the cache when a
// buffer of exactly that size is there, else newly allocated (huge-page advised on Linux).
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached buffer; returns the number of bytes given back.
size_t empty_cache();

// Bytes currently held in the cache (not in use).
size_t cached_bytes();

}  // namespace kdfused::cpu
