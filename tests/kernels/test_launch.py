"""The cached-launch fast path (`pagoda.kernels.launch.fast`): reuse only for an identical specialisation."""
import types

import pytest
import torch

from pagoda.kernels.launch import fast as _launch


class _FakeCompiled:
    packed_metadata = "meta"
    function = "fn"

    def __init__(self, log):
        self.log = log

    @property
    def run(self):
        return lambda *a: self.log.append(("fast", a[:3], a[9:]))


class _FakeKernel:
    arg_names = ["X", "n", "scale", "BLOCK"]
    params = [types.SimpleNamespace(name=n, has_default=False, default=None) for n in arg_names]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.log.append(("slow", grid, args, kwargs))
            return _FakeCompiled(self.log)
        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(_launch, "enabled", lambda: True)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "_device_stream", (lambda: 0, lambda device: 7))


def test_second_identical_launch_takes_the_compiled_launcher(fast):
    k, x = _FakeKernel(), torch.zeros(64)
    _launch.launch(k, (3,), x, 16, 0.5, BLOCK=32)
    _launch.launch(k, (5, 2), x, 16, 0.5, BLOCK=32)
    assert [e[0] for e in k.log] == ["slow", "fast"]
    assert k.log[1][1] == (5, 2, 1)                      # grid padded to 3 dims
    assert k.log[1][2] == (x, 16, 0.5, 32)               # every parameter, constexprs included, in order


@pytest.mark.parametrize("change", ["int", "one", "misaligned", "dtype", "constexpr", "warps"])
def test_any_change_of_specialisation_recompiles(fast, change):
    k, x = _FakeKernel(), torch.zeros(64)
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)
    args, kw, opts = [x, 16, 0.5], {"BLOCK": 32}, {}
    if change == "int":
        args[1] = 17
    elif change == "one":
        args[1] = 1
    elif change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[0] = x.half()
    elif change == "constexpr":
        kw["BLOCK"] = 64
    else:
        opts["num_warps"] = 8
    _launch.launch(k, (1,), *args, **kw, **opts)
    assert [e[0] for e in k.log] == ["slow", "slow"]


class _TypedKernel(_FakeKernel):
    """Like `_FakeKernel`, with Triton's ``is_constexpr`` on each parameter (BLOCK is the constexpr)."""
    params = [types.SimpleNamespace(name=n, has_default=False, default=None, is_constexpr=n == "BLOCK")
              for n in _FakeKernel.arg_names]


@pytest.mark.parametrize("first, second, reused", [
    (17, 33, True), (32, 48, True), (-5, 7, True),              # same class: i32, not 1, (not) divisible by 16
    (17, 32, False), (16, 1, False), (17, 2**31, False),        # divisibility, == 1, i32 -> i64
    (2**31 + 1, 2**40 + 3, True), (2**40, 2**63, False)])           # i64 vs u64
def test_runtime_ints_are_keyed_by_triton_specialisation(fast, first, second, reused):
    k, x = _TypedKernel(), torch.zeros(64)
    _launch.launch(k, (1,), x, first, 0.5, BLOCK=32)
    _launch.launch(k, (1,), x, second, 0.5, BLOCK=32)
    assert [e[0] for e in k.log] == ["slow", "fast" if reused else "slow"]
    if reused:
        assert k.log[1][2] == (x, second, 0.5, 32)          # the new value reaches the launcher


def test_constexpr_and_bool_arguments_stay_keyed_by_value(fast):
    k, x = _TypedKernel(), torch.zeros(64)
    _launch.launch(k, (1,), x, 17, 0.5, BLOCK=32)
    _launch.launch(k, (1,), x, 17, 0.5, BLOCK=48)             # constexpr: another compiled kernel
    _launch.launch(k, (1,), x, True, 0.5, BLOCK=32)           # a bool is not an int class
    _launch.launch(k, (1,), x, 17, 0.25, BLOCK=32)            # floats: exact (stricter than Triton)
    assert [e[0] for e in k.log] == ["slow"] * 4


def test_disabled_always_takes_the_normal_path(monkeypatch):
    monkeypatch.setattr(_launch, "enabled", lambda: False)
    k, x = _FakeKernel(), torch.zeros(4)
    for _ in range(3):
        _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32, num_warps=2)
    assert [e[0] for e in k.log] == ["slow"] * 3
    assert k.log[0][3] == {"BLOCK": 32, "num_warps": 2}


def test_profiler_hooks_force_the_normal_path(fast, monkeypatch):
    monkeypatch.setattr(_launch, "_no_hooks", lambda: False)
    k, x = _FakeKernel(), torch.zeros(4)
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)
    assert [e[0] for e in k.log] == ["slow", "slow"]


def test_no_hooks_installed_by_default():
    assert _launch._no_hooks()


class _FakeTuned:
    arg_names = ["X", "n", "scale", "BLOCK"]
    keys = ["n"]

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0
        self.best_config = types.SimpleNamespace(kwargs={"BLOCK": 64}, num_warps=8, num_stages=3, pre_hook=None)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls += 1
        return call


def test_tuned_launch_reuses_the_chosen_config_per_key(fast, monkeypatch):
    monkeypatch.setattr(_launch, "_tuned_configs", {})
    k, x = _FakeKernel(), torch.zeros(4)
    k.arg_names = ["X", "n", "scale", "BLOCK"]
    tuned = _FakeTuned(k)
    _launch.launch_tuned(tuned, k, lambda m: (m["BLOCK"],), x, 16, 0.5)
    assert tuned.calls == 1 and k.log == []                   # the autotuner ran
    _launch.launch_tuned(tuned, k, lambda m: (m["BLOCK"],), x, 16, 0.5)
    assert tuned.calls == 1 and k.log[0][:2] == ("slow", (64,))   # its choice, launched directly
    assert k.log[0][3] == {"BLOCK": 64, "num_warps": 8, "num_stages": 3}
    _launch.launch_tuned(tuned, k, lambda m: (m["BLOCK"],), x, 32, 0.5)   # new key: tune again
    assert tuned.calls == 2
    _launch.launch_tuned(tuned, k, lambda m: (m["BLOCK"],), x, 16, 0.5, extra_key=(True,))
    assert tuned.calls == 3


def test_recording_and_replay_swap_only_the_named_tensors(fast):
    k, x, y, z = _FakeKernel(), torch.zeros(64), torch.ones(64), torch.full((64,), 2.0)
    with _launch.recording() as launches:
        _launch.launch(k, (3,), x, 16, 0.5, BLOCK=32)       # slow (first) launch is recorded
        _launch.launch(k, (4,), x, 16, 0.5, BLOCK=32)       # fast launch too
    assert len(launches) == 2 and launches[0][1] == (3, 1, 1) and launches[1][1] == (4, 1, 1)
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)           # outside the block: not recorded
    assert len(launches) == 2
    assert _launch.replay(_launch.Bound(launches[1:], (x,)), (y,))
    assert k.log[-1] == ("fast", (4, 1, 1), (y, 16, 0.5, 32)), "X swapped for the given tensor, rest kept"
    assert _launch.replay(_launch.Bound(launches[1:], (z,)), (z,)) and k.log[-1][2] == (x, 16, 0.5, 32)


def test_a_bound_launch_keeps_no_reference_to_its_swapped_tensors(fast):
    k, x, y = _FakeKernel(), torch.zeros(64), torch.ones(64)
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)
    with _launch.recording() as launches:
        _launch.launch(k, (2,), x, 16, 0.5, BLOCK=32)
    bound = _launch.Bound(launches, (x,))
    assert not any(a is x for _, args, _ in bound.calls for a in args)
    bound(5, (y,))
    assert k.log[-1] == ("fast", (2, 1, 1), (y, 16, 0.5, 32))


def test_replay_refuses_when_launch_hooks_are_installed(fast, monkeypatch):
    k, x = _FakeKernel(), torch.zeros(64)
    with _launch.recording() as launches:
        _launch.launch(k, (3,), x, 16, 0.5, BLOCK=32)
    monkeypatch.setattr(_launch, "_no_hooks", lambda: False)
    n = len(k.log)
    assert not _launch.replay(_launch.Bound(launches, (x,)), (x,)) and len(k.log) == n


def test_recording_is_empty_when_the_fast_path_is_off(monkeypatch):
    monkeypatch.setattr(_launch, "enabled", lambda: False)
    k, x = _FakeKernel(), torch.zeros(4)
    with _launch.recording() as launches:
        _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)
    assert launches == [] and _launch._recorder is None


class _OnDevice1(torch.Tensor):
    """A CPU tensor that reports CUDA device 1 (the launch's device guard reads ``get_device``)."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    def get_device(self):
        return 1


@pytest.fixture
def two_devices(fast, monkeypatch):
    """Device 0 current; ``torch.cuda.device(i)`` makes i current for its block and records i."""
    import contextlib
    state = {"current": 0, "entered": []}
    monkeypatch.setattr(_launch, "_device_stream", (lambda: state["current"], lambda d: 7 + d))

    @contextlib.contextmanager
    def device(i):
        state["entered"].append(i)
        old, state["current"] = state["current"], i
        try:
            yield
        finally:
            state["current"] = old
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    return state


def test_launch_runs_on_the_device_of_its_first_tensor(two_devices):
    k, x = _FakeKernel(), torch.Tensor._make_subclass(_OnDevice1, torch.zeros(64))
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)            # normal path, inside the guard
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32)            # compiled launcher, inside the guard
    assert [e[0] for e in k.log] == ["slow", "fast"]
    assert two_devices["entered"] == [1, 1] and two_devices["current"] == 0
    assert [key[1] for key in _launch._compiled] == [1]      # compiled for device 1, keyed so
    y = torch.zeros(64)                                       # a CPU tensor (interpreter path): no guard
    _launch.launch(k, (1,), y, 16, 0.5, BLOCK=32)
    assert two_devices["entered"] == [1, 1]


def test_replay_runs_on_the_device_of_its_tensors(two_devices):
    k, x = _FakeKernel(), torch.Tensor._make_subclass(_OnDevice1, torch.zeros(64))
    bound = {}
    fn = lambda: _launch.launch(k, (2,), x, 16, 0.5, BLOCK=32)   # noqa: E731
    _launch.launch(k, (2,), x, 16, 0.5, BLOCK=32)             # compile first, so the record is bound
    _launch.replay_or_record(bound, "key", (x,), fn, 1)
    entered = len(two_devices["entered"])
    _launch.replay_or_record(bound, "key", (x,), fn, 1)      # a replay
    assert two_devices["entered"][entered:] == [1] and two_devices["current"] == 0


def test_device_of_is_a_no_op_for_cpu_and_current_device_tensors(two_devices):
    with _launch.device_of((torch.zeros(2),)):
        pass
    with _launch.device_of((3, torch.zeros(2))):
        pass
    assert two_devices["entered"] == []
    with _launch.device_of((torch.Tensor._make_subclass(_OnDevice1, torch.zeros(2)),)):
        assert two_devices["current"] == 1
    assert two_devices["entered"] == [1]


def _gluon_desc(t, block):
    from pagoda.kernels.hopper import gluon as G
    if not G.GLUON_OK:
        pytest.skip("no Gluon in this Triton")
    return G.TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), G.smem_layout(tuple(block), t.dtype))


def test_descriptor_arguments_are_keyed_by_dtype_block_and_layout(fast):
    k = _TypedKernel()
    a = torch.zeros(4, 64, 128, dtype=torch.bfloat16)
    b = torch.zeros(2, 256, 128, dtype=torch.bfloat16)          # another shape: same specialisation
    _launch.launch(k, (1,), _gluon_desc(a, (1, 64, 128)), 16, 0.5, BLOCK=32)
    db = _gluon_desc(b, (1, 64, 128))
    _launch.launch(k, (1,), db, 16, 0.5, BLOCK=32)
    assert [e[0] for e in k.log] == ["slow", "fast"] and k.log[1][2][0] is db   # the new descriptor is passed
    _launch.launch(k, (1,), _gluon_desc(b, (1, 128, 128)), 16, 0.5, BLOCK=32)   # another block shape
    _launch.launch(k, (1,), _gluon_desc(b.half(), (1, 64, 128)), 16, 0.5, BLOCK=32)  # another dtype
    assert [e[0] for e in k.log] == ["slow", "fast", "slow", "slow"]


def test_maxnreg_and_a_num_warps_parameter(fast):
    class _GluonLike(_FakeKernel):
        arg_names = ["X", "n", "scale", "BLOCK", "num_warps"]
        params = [types.SimpleNamespace(name=n, has_default=False, default=None,
                                        is_constexpr=n in ("BLOCK", "num_warps"))
                  for n in arg_names]
    k, x = _GluonLike(), torch.zeros(64)
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32, num_warps=4, maxnreg=168)
    assert k.log[0][3] == {"BLOCK": 32, "num_warps": 4, "maxnreg": 168}     # options reach the normal launch
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32, num_warps=4, maxnreg=168)
    assert k.log[1][0] == "fast" and k.log[1][2] == (x, 16, 0.5, 32, 4)   # the num_warps parameter's value
    _launch.launch(k, (1,), x, 16, 0.5, BLOCK=32, num_warps=4, maxnreg=128)
    assert k.log[2][0] == "slow"                                            # maxnreg is part of the key


def test_equal_python_values_of_other_types_are_other_keys(fast):
    k, x = _TypedKernel(), torch.zeros(64)
    for block in (1, True, 1.0):                              # equal in Python, three kernels to Triton
        _launch.launch(k, (1,), x, 17, 0.5, BLOCK=block)
    assert [e[0] for e in k.log] == ["slow", "slow", "slow"]


def test_an_unhashable_argument_takes_the_normal_launch(fast):
    k, x = _TypedKernel(), torch.zeros(64)
    for _ in range(2):
        _launch.launch(k, (1,), x, 17, 0.5, BLOCK=[32])      # not hashable: no cache, no crash
    assert [e[0] for e in k.log] == ["slow", "slow"]


def test_a_descriptor_argument_sets_the_launch_device(two_devices):
    from pagoda.kernels.hopper import gluon as G
    if not G.GLUON_OK:
        pytest.skip("no Gluon in this Triton")
    t = torch.Tensor._make_subclass(_OnDevice1, torch.zeros(4, 64, 128, dtype=torch.bfloat16))
    desc = G.TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 64, 128], G.smem_layout((1, 64, 128), t.dtype))
    k = _TypedKernel()
    _launch.launch(k, (1,), desc, 16, 0.5, BLOCK=32)
    assert two_devices["entered"] == [1]


class CudaLauncher:
    """Shaped like Triton 3.6's launcher: a compiled C ``launch`` plus scratch sizes."""
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, scratch):
        self.launch = len                      # any builtin stands for the compiled C function
        self.global_scratch_size, self.profile_scratch_size = scratch

    def __call__(self, *args):
        raise AssertionError("not called")


@pytest.mark.parametrize("scratch, direct", [((0, 0), True), ((64, 0), False), ((0, 8), False)])
def test_bound_launches_call_the_c_launcher_only_without_scratch(monkeypatch, scratch, direct):
    monkeypatch.setattr(_launch, "_DIRECT_OK", True)
    ck = types.SimpleNamespace(run=CudaLauncher(scratch), function="fn", packed_metadata=(4, 1, 0))
    fn, head = _launch._direct(ck)
    if direct:
        assert fn is len and head == ("fn", False, True, None, None, (4, 1, 0), None, None, None)
    else:
        assert fn is ck.run and head == ("fn", (4, 1, 0), None, None, None)
    monkeypatch.setattr(_launch, "_DIRECT_OK", False)         # another Triton: always its Python launcher
    assert _launch._direct(ck)[0] is ck.run
