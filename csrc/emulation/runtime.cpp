// The emulated launch: every thread of a block is a fiber started with setcontext; switches
// then use _setjmp/_longjmp (no signal-mask system call per switch). __syncthreads returns to
// the scheduler, which releases the barrier once every live fiber waits at it; fibers that
// waited a different number of times reveal a divergent barrier, reported as a launch error.
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "emulate.h"

namespace emu {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;
int block_order = 0;  // 0: x fastest, 1: reversed, 2: shuffled

namespace {

struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  std::vector<char> stack;
  int state;  // 0 runnable, 1 waiting at a barrier, 2 done
  long waits;
  bool started;
};

cudaError_t status = cudaSuccess;
jmp_buf scheduler;
std::vector<Fiber> fibers;
Fiber* current;
void (*body_fn)(void*);
void* body_ctx;

void entry() {
  body_fn(body_ctx);
  current->state = 2;
  _longjmp(scheduler, 1);
}

}  // namespace

void sync() {
  current->state = 1;
  ++current->waits;
  if (!_setjmp(current->jb)) _longjmp(scheduler, 1);
}

cudaError_t launch_status() {
  const cudaError_t s = status;
  status = cudaSuccess;
  return s;
}

void run(dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt == 0 || nt > 1024 || grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.z != 1) {
    status = cudaErrorInvalidConfiguration;
    return;
  }
  grid_dim = grid;
  block_dim = block;
  body_fn = body;
  body_ctx = ctx;
  std::vector<uint3> blocks;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, 0});
  if (block_order == 1) std::reverse(blocks.begin(), blocks.end());
  if (block_order == 2) std::shuffle(blocks.begin(), blocks.end(), std::mt19937(1234));
  fibers.resize(nt);
  for (Fiber& f : fibers)
    if (f.stack.empty()) f.stack.resize(1 << 18);
  for (const uint3 b : blocks) {
    for (Fiber& f : fibers) {
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, entry, 0);
      f.state = 0;
      f.waits = 0;
      f.started = false;
    }
    for (;;) {
      for (unsigned t = 0; t < nt; ++t) {
        Fiber& f = fibers[t];
        if (f.state != 0) continue;
        current = &f;
        thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        block_idx = b;
        if (!_setjmp(scheduler)) {
          if (!f.started) {
            f.started = true;
            setcontext(&f.ctx);
          }
          _longjmp(f.jb, 1);
        }
      }
      long waits = -1;
      bool waiting = false;
      for (Fiber& f : fibers) {
        if (f.state != 1) continue;
        if (waits >= 0 && f.waits != waits) {
          std::fprintf(stderr, "emulation: divergent __syncthreads in block (%u, %u)\n", b.x, b.y);
          status = cudaErrorLaunchFailure;
        }
        waits = f.waits;
        waiting = true;
        f.state = 0;
      }
      if (!waiting) break;
    }
  }
}

}  // namespace emu
