"""Where does pagoda's HF generate lose ~60 µs per layer and step against SDPA? (GPU; CPU smoke run without one.)

Session 7 measured, at batch 128 (dynamic cache, qwen3-0.6b shape, 32 new tokens): pagoda 0.94-0.95x SDPA's
wall time per generate, ~56 ms over 896 attention calls, while the attention call's own host time differed by
~9 µs in isolation (2026-11-30). This times, inside real generates and alternating in one process:

- ``sdpa``: HF's own SDPA attention function, wrapped in the timer below;
- ``sdpa_alias``: the same function registered under another name (with SDPA's mask builder), to see whether
  HF treats a registered name differently from "sdpa";
- ``pagoda``: pagoda's attention function;
- ``pagoda_nogc`` / ``sdpa_nogc``: the same with Python's cyclic GC frozen and disabled for the generate.

Every attention call is timed on the host (perf_counter, no sync), split into the first layer of a forward
and the others; the time outside attention calls is the wall time minus those. Prints ms per generate for
each (median of the rounds) and µs per attention call.

    PYTHONPATH=$PWD python3 benchmarks/e2e_host_insitu.py [batch] [rounds] > $OUT/e2e-host-insitu.txt
"""
import gc
import statistics
import sys
import time

from pagoda.bench import e2e


class _Timer:
    """Wraps an attention function: host time of each call, the first call of a forward apart."""

    def __init__(self, fn, first_layer):
        self.fn, self.first_layer = fn, first_layer
        self.reset()

    def reset(self):
        self.first, self.rest = [], []

    def __call__(self, module, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(module, *args, **kwargs)
        dt = time.perf_counter() - t0
        (self.first if module is self.first_layer else self.rest).append(dt)
        return out


def _use(model, name: str) -> None:
    """Point every attention layer at the registered function ``name`` (no re-registration, no hub lookup:
    `e2e._set_impl` would re-register pagoda's unwrapped function)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from pagoda.integrations.transformers import pagoda_attention_forward, register

    device, model, sync = e2e.probe_model()
    register()
    first_layer = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    timers = {"sdpa": _Timer(sdpa_attention_forward, first_layer),
              "sdpa_alias": _Timer(sdpa_attention_forward, first_layer),
              "pagoda": _Timer(pagoda_attention_forward, first_layer)}
    for name, timer in timers.items():
        AttentionInterface.register(name, timer)
    AttentionMaskInterface.register("sdpa_alias", sdpa_mask)
    variants = ["sdpa", "sdpa_alias", "pagoda", "pagoda_nogc", "sdpa_nogc"]
    runs = {}
    for v in variants:
        impl = v.replace("_nogc", "")
        _use(model, impl)
        runs[v] = e2e._generate_fn(model, "pagoda" if impl == "pagoda" else "sdpa", batch, 128, 32, "dynamic",
                                   "none", device)
        runs[v]()
        sync()
    rows = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            impl = v.replace("_nogc", "")
            timer = timers[impl]
            _use(model, impl)
            timer.reset()
            nogc = v.endswith("_nogc")
            if nogc:
                gc.collect()
                gc.freeze()
                gc.disable()
            sync()
            t0 = time.perf_counter()
            runs[v]()
            sync()
            wall = time.perf_counter() - t0
            if nogc:
                gc.enable()
                gc.unfreeze()
            attn = sum(timer.first) + sum(timer.rest)
            rows[v].append((wall, attn, statistics.mean(timer.first), statistics.mean(timer.rest),
                            len(timer.first) + len(timer.rest)))
        print("round done", flush=True)
    print(f"batch {batch}, {rounds} rounds alternating; medians. ms per generate; µs per attention call")
    print(f"{'variant':12s} {'wall ms':>9s} {'attn ms':>9s} {'other ms':>9s} {'first µs':>9s} {'rest µs':>9s} calls")
    for v in variants:
        med = [statistics.median(r[i] for r in rows[v]) for i in range(4)]
        print(f"{v:12s} {med[0] * 1e3:9.1f} {med[1] * 1e3:9.1f} {(med[0] - med[1]) * 1e3:9.1f} "
              f"{med[2] * 1e6:9.1f} {med[3] * 1e6:9.1f} {rows[v][0][4]}")
    print("all walls ms:", {v: [round(r[0] * 1e3, 1) for r in rows[v]] for v in variants})


if __name__ == "__main__":
    main()
