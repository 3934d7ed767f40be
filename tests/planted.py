"""Deliberately broken copies of the kernel source, for tests that show a checker catches the
break: each entry drops one ordering step the kernel's protocol needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from flashmoe.host import compile as compile_mod

PLANTED = {
    # Every block publishes its dispatched rows (and its results) before it counts itself done;
    # without the fence, the rows of all but the last block stay unseen when the last one signals.
    "dispatch-fence": ("flashmoe/device/common/wait.cuh",
                       "  if (lane == 0) {\n    fence_world(p);\n    u32* counter",
                       "  if (lane == 0) {\n    u32* counter"),
    # Ranks in separate launches (other GPUs) see each other's writes only through system scope;
    # gpu scope there leaves them in the writer's GPU.
    "world-scope": ("flashmoe/device/common/transport.cuh",
                    "  return !FLASHMOE_TRANSPORT_NVSHMEM && p.num_local_ranks == p.world;",
                    "  return true;"),
    # A GEMM0 tile's rows reach the GEMM1 tiles of other blocks through the fence before the
    # tile's done-counter.
    "gemm0-fence": ("flashmoe/device/roles/expert_gemm.cuh",
                    "    fence_acq_rel_gpu();\n    atomic_add_relaxed_gpu(region<u32>(p, c.slice, kTileDone",
                    "    atomic_add_relaxed_gpu(region<u32>(p, c.slice, kTileDone"),
    # The wgmma consumers release a tile's last stage once its wgmmas are done; without it the
    # producer can never refill that stage (a bounded wait must report it).
    "stage-release": ("flashmoe/device/gemm/wgmma.cuh",
                      "    if (ktiles > 0 && (ct & 31) == 0) mbar_arrive(&bar.empty[(stage0 + ktiles - 1) % kStages]);\n",
                      ""),
    # A ping-pong team starts on its tile's stages only once the other team has waited for the
    # tile's before it (gemm/wgmma.cuh turns); without, it may wait on a stage whose earlier fill
    # has not landed yet, a phase the parity cannot tell from its own.
    "pingpong-turn": ("flashmoe/device/gemm/wgmma.cuh",
                      "    if (!kPingPong || n == 0) return true;\n",
                      "    return true;\n"),
    # The producer writes a table slot's job and context before the barrier and arrives after it;
    # here its first thread arrives first and writes after: the consumers may read the last job.
    "slot-after-arrive": ("flashmoe/device/roles/tasks.cuh",
                          "      tt.job = job;\n      tt.ctx = *cr;\n    }\n    G::sync();\n"
                          "    if (G::rank() == 0) mbar_arrive(&bar.ready[n & 1]);\n",
                          "      mbar_arrive(&bar.ready[n & 1]);\n      tt.job = job;\n      tt.ctx = *cr;\n    }\n"
                          "    G::sync();\n"),
    # A consumer releases stage n - 1 once its wgmmas have completed (wait_group 1); waiting only
    # for the group before lets the producer refill a stage the tensor cores still read.
    "stage-early-release": ("flashmoe/device/gemm/wgmma.cuh",
                            "      wgmma_wait<1>();                                // stage n - 1's wgmmas have completed\n",
                            "      wgmma_wait<2>();\n"),
    # A flag to an NVSHMEM peer must be delivered after the data put before it.
    "nvshmem-fence": ("flashmoe/device/common/transport_nvshmem.cuh",
                      "    fence_acq_rel_sys();   // this thread's and (by cumulativity) the block's P2P stores\n"
                      "    nvshmem_fence();\n",
                      "    fence_acq_rel_sys();   // this thread's and (by cumulativity) the block's P2P stores\n"),
    # After seeing an NVSHMEM peer's flag, its data is visible only after the consistency step.
    "consistency-step": ("flashmoe/device/common/transport_nvshmem.cuh",
                         "    (void)nvshmem_uint32_test(const_cast<uint32_t*>(flag), NVSHMEM_CMP_GE, 0u);",
                         "    (void)flag;"),
}


def planted_tree(root: Path, name: str) -> Path:
    """A copy of flashmoe/device under ``root`` with PLANTED[name] applied (an include root for
    ``emulator.EmulatedKernel``)."""
    path, old, new = PLANTED[name]
    shutil.copytree(compile_mod.INCLUDE_ROOT / compile_mod.DEVICE_DIR, root / compile_mod.DEVICE_DIR)
    source = root / path
    text = source.read_text()
    assert text.count(old) == 1, f"{name}: the code to remove is not in {path} any more"
    source.write_text(text.replace(old, new))
    return root
