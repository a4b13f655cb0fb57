"""Every CPU implementation of the HDC kernels against the float64/exact reference.

Fresh random inputs at awkward sizes (D not a multiple of 64, one row, one query, empty
segments, k larger than a segment), outputs poisoned before each run so an element a kernel
forgot to write fails, and one clear InputError for each kind of bad input.
"""

from __future__ import annotations

import edge_runtime.kernels as K
import pytest
import torch
from edge_runtime.kernels import reference
from edge_runtime.kernels._alloc import poisoned_outputs
from edge_runtime.kernels.hadamard import fwht, hadamard_project

from edge_runtime.errors import BackendUnavailableError, InputError

FAST = ["cpp", "torch"]
DIMS = [1, 63, 64, 65, 130, 1000]


def _packed(gen: torch.Generator, n: int, d: int, dup_every: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    if dup_every:  # duplicated rows force distance ties across rows
        x[dup_every::dup_every] = x[0]
    return reference.pack_bits(x)


def _offsets(gen: torch.Generator, m: int, s: int) -> torch.Tensor:
    """S segments over m rows, some empty, in random sizes."""
    cuts = torch.sort(torch.randint(0, m + 1, (s - 1,), generator=gen)).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([m])]).to(torch.int64)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("d", DIMS)
def test_pack_matches_reference(backend: str, d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(5, d, generator=gen, dtype=torch.float64)
    x[0, : d // 2] = 0.0  # zero is not > 0: bit stays clear
    x[1, 0] = 1e-300  # positive but below float32's range: must still set the bit
    with poisoned_outputs():
        got = K.pack_bits(x, backend=backend)
    assert torch.equal(got, reference.pack_bits(x))
    assert torch.equal(K.unpack_bits(got, d), x > 0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("d", DIMS)
def test_hamming_exact(backend: str, d: int) -> None:
    gen = torch.Generator().manual_seed(100 + d)
    for b, m in [(1, 1), (3, 17), (11, 300)]:
        q, mem = _packed(gen, b, d), _packed(gen, m, d)
        with poisoned_outputs():
            got = K.hamming(q, mem, backend=backend)
        assert got.dtype == torch.int32
        assert torch.equal(got, reference.hamming(q, mem))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("d", [1, 65, 130, 1000])
def test_segmented_topk_exact(backend: str, d: int) -> None:
    gen = torch.Generator().manual_seed(200 + d)
    # (queries, rows, segments, k): one query, one row, k > segment, many rows (the C++
    # kernel splits rows across threads above 512 rows per chunk), many duplicate rows
    cases = [(1, 1, 1, 1), (1, 1, 1, 4), (3, 40, 4, 5), (2, 2100, 3, 7), (17, 300, 6, 1)]
    for b, m, s, k in cases:
        q = _packed(gen, b, d)
        mem = _packed(gen, m, d, dup_every=3)
        off = _offsets(gen, m, s)
        with poisoned_outputs():
            dist, idx = K.segmented_hamming_topk(q, mem, off, k, backend=backend)
        ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, k)
        assert dist.shape == (b, s, k) and dist.dtype == torch.int32 and idx.dtype == torch.int64
        assert torch.equal(dist, ref_d), (b, m, s, k)
        assert torch.equal(idx, ref_i), (b, m, s, k)


@pytest.mark.parametrize("parallel_work", [0, 1 << 40])
def test_cpp_threaded_and_serial_scans_agree(
    monkeypatch: pytest.MonkeyPatch, parallel_work: int
) -> None:
    # 0 forces the split of rows into chunks whose partial top-k lists are merged (what big
    # scans do); 2**40 forces one thread.
    from edge_runtime.kernels import cpp_backend

    monkeypatch.setattr(cpp_backend, "PARALLEL_WORK", parallel_work)
    gen = torch.Generator().manual_seed(parallel_work % 97)
    for b, m, s, k in [(1, 1600, 3, 4), (3, 2100, 5, 7), (9, 1100, 1, 2)]:
        q, mem = _packed(gen, b, 130), _packed(gen, m, 130, dup_every=4)
        off = _offsets(gen, m, s)
        with poisoned_outputs():
            dist, idx = K.segmented_hamming_topk(q, mem, off, k, backend="cpp")
            ham = K.hamming(q, mem, backend="cpp")
        ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, k)
        assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i), (b, m, s, k)
        assert torch.equal(ham, reference.hamming(q, mem))


@pytest.mark.parametrize("parallel_work", [0, 1 << 40])
def test_cpu_topk_validated_and_allocated_natively_is_exact(
    monkeypatch: pytest.MonkeyPatch, parallel_work: int
) -> None:
    # backend "auto" on CPU, outputs not poisoned: the single native call that validates,
    # allocates and scans (what one frame per call takes). Serial and threaded, tile
    # remainders (rows not a multiple of 4, 1/2/4/8-query blocks), non-contiguous inputs.
    from edge_runtime.kernels import api, cpp_backend

    lean = api._lean_cpu_topk("auto")
    assert lean is not None
    used: list[int] = []

    def spy(*args: object) -> object:
        used.append(1)
        return lean(*args)

    monkeypatch.setattr(api, "_lean_cpu_topk", lambda backend: spy)
    monkeypatch.setattr(cpp_backend, "PARALLEL_WORK", parallel_work)
    gen = torch.Generator().manual_seed(31 + parallel_work % 89)
    cases = [(1, 1, 1, 3, 65), (1, 2103, 3, 5, 2048), (2, 7, 2, 2, 64), (5, 701, 4, 2, 130)]
    cases += [(15, 1030, 5, 9, 1000), (3, 0, 1, 2, 64), (4, 40, 5, 50, 10000)]
    for b, m, s, k, d in cases:
        q, mem = _packed(gen, b, d), _packed(gen, m, d, dup_every=3 if m else 0)
        off = _offsets(gen, m, s)
        dist, idx = K.segmented_hamming_topk(q, mem, off, k)
        ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, k)
        assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i), (b, m, s, k, d)
    q, mem = _packed(gen, 6, 130)[::2], _packed(gen, 90, 130)[::3]
    off = torch.tensor([0, 0, 12, 12, 30, 30])[::2]
    assert not (q.is_contiguous() or mem.is_contiguous() or off.is_contiguous())
    dist, idx = K.segmented_hamming_topk(q, mem, off, 4)
    ref_d, ref_i = reference.segmented_hamming_topk(q.contiguous(), mem.contiguous(), off, 4)
    assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    assert len(used) == len(cases) + 1


def test_native_cpu_topk_hands_bad_inputs_to_the_checks() -> None:
    # the native call only says that a check failed; the Python checks name the mistake
    gen = torch.Generator().manual_seed(2)
    q, mem = _packed(gen, 2, 100), _packed(gen, 10, 100)
    off = torch.tensor([0, 4, 10])
    with pytest.raises(InputError, match="offsets must be int64"):
        K.segmented_hamming_topk(q, mem, off.int(), 1)
    with pytest.raises(InputError, match="offsets must be a 1-D"):
        K.segmented_hamming_topk(q, mem, off.view(1, 3), 1)
    with pytest.raises(InputError, match="offsets must be a 1-D"):
        K.segmented_hamming_topk(q, mem, [0, 4, 10], 1)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="k must be"):
        K.segmented_hamming_topk(q, mem, off, True)
    with pytest.raises(InputError, match="2-D packed"):
        K.segmented_hamming_topk(q[0], mem, off, 1)
    with pytest.raises(InputError, match="memory must be int64"):
        K.segmented_hamming_topk(q, mem.int(), off, 1)


def test_native_cpu_topk_only_where_the_cpp_backend_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edge_runtime.kernels import api

    assert api._lean_cpu_topk("auto") is not None and api._lean_cpu_topk("cpp") is not None
    assert api._lean_cpu_topk("torch") is None and api._lean_cpu_topk("reference") is None
    with poisoned_outputs():  # outputs must come from _alloc, poisoned
        assert api._lean_cpu_topk("auto") is None
    monkeypatch.setenv("EDGE_RUNTIME_KERNEL_BACKEND", "torch")
    assert api._lean_cpu_topk("auto") is None
    monkeypatch.setenv("EDGE_RUNTIME_KERNEL_BACKEND", "auto")
    assert api._lean_cpu_topk("auto") is not None


@pytest.mark.parametrize("backend", FAST)
def test_topk_with_all_segments_empty_but_one(backend: str) -> None:
    gen = torch.Generator().manual_seed(7)
    q, mem = _packed(gen, 2, 70), _packed(gen, 5, 70)
    off = torch.tensor([0, 0, 5, 5], dtype=torch.int64)
    with poisoned_outputs():
        dist, idx = K.segmented_hamming_topk(q, mem, off, 2, backend=backend)
    ref_d, ref_i = reference.segmented_hamming_topk(q, mem, off, 2)
    assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    assert (idx[:, 0] == -1).all() and (dist[:, 2] == 2**31 - 1).all()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("d", [1, 65, 300])
def test_cosine_max_matches_reference(backend: str, d: int) -> None:
    gen = torch.Generator().manual_seed(300 + d)
    for b, m, s in [(1, 1, 1), (4, 50, 3), (9, 200, 5)]:
        q, mem = torch.randn(b, d, generator=gen), torch.randn(m, d, generator=gen)
        off = _offsets(gen, m, s)
        best, idx = K.segmented_cosine_max(q, mem, off, backend=backend)
        ref_b, ref_i = reference.segmented_cosine_max(q, mem, off)
        finite = torch.isfinite(ref_b)
        assert torch.equal(torch.isfinite(best), finite)
        assert torch.allclose(best.double()[finite], ref_b[finite], atol=1e-5)
        assert torch.equal(idx[~finite], ref_i[~finite])
        # indices may only differ on a near-tie, where both rows score the same
        sims = (
            torch.nn.functional.normalize(q.double(), dim=1)
            @ torch.nn.functional.normalize(mem.double(), dim=1).T
        )
        chosen = sims.gather(1, idx.clamp(min=0))
        assert torch.allclose(chosen[finite], ref_b[finite], atol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("f", "d"), [(1, 1), (37, 130), (64, 64), (100, 1000)])
def test_sign_projection_exact_on_integer_inputs(backend: str, f: int, d: int) -> None:
    # integer features and ±1 weights make float32 sums exact, so the signs must match the
    # float64 reference bit for bit (including exact zeros, which give a clear bit)
    gen = torch.Generator().manual_seed(f * 1000 + d)
    x = torch.randint(-2, 3, (6, f), generator=gen).float()
    w = (2 * torch.randint(0, 2, (d, f), generator=gen) - 1).float()
    bias = torch.randint(-1, 2, (d,), generator=gen).float()
    with poisoned_outputs():
        got = K.sign_project_pack(x, w, bias, backend=backend)
        got_nb = K.sign_project_pack(x, w, backend=backend)
    assert torch.equal(got, reference.sign_project_pack(x, w, bias))
    assert torch.equal(got_nb, reference.sign_project_pack(x, w))


def test_fwht_equals_explicit_hadamard_matrix() -> None:
    for p in (1, 2, 64, 256):
        assert torch.equal(fwht(torch.eye(p, dtype=torch.float64)), reference.hadamard_matrix(p))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("f", "d"), [(1, 1), (37, 130), (64, 64), (100, 1000), (300, 700)])
def test_hadamard_projection_exact_on_integer_inputs(backend: str, f: int, d: int) -> None:
    gen = torch.Generator().manual_seed(f + 7 * d)
    signs = K.hadamard_signs(f, d, seed=f + d)
    x = torch.randint(-3, 4, (5, f), generator=gen).float()
    bias = torch.randint(-2, 3, (d,), generator=gen).float()
    with poisoned_outputs():
        got = K.hadamard_project_pack(x, signs, d, bias, backend=backend)
        got_nb = K.hadamard_project_pack(x, signs, d, backend=backend)
    assert torch.equal(got, reference.hadamard_project_pack(x, signs, d, bias))
    assert torch.equal(got_nb, reference.hadamard_project_pack(x, signs, d))


@pytest.mark.parametrize("backend", FAST)
def test_hadamard_projection_float_inputs_agree_off_the_boundary(backend: str) -> None:
    # real-valued features: float32 rounding may flip only components that are ~0 in float64
    gen = torch.Generator().manual_seed(11)
    f, d = 200, 1000
    signs = K.hadamard_signs(f, d, seed=3)
    x = torch.randn(8, f, generator=gen)
    got = K.unpack_bits(K.hadamard_project_pack(x, signs, d, backend=backend), d)
    h = hadamard_project(x.double(), signs.double(), d)
    near_zero = h.abs() < 1e-3 * h.abs().amax(dim=1, keepdim=True)
    assert torch.equal(got[~near_zero], (h > 0)[~near_zero])


def test_hadamard_projection_preserves_angles() -> None:
    """SimHash property: normalised Hamming distance ≈ angle / π."""
    gen = torch.Generator().manual_seed(5)
    f, d = 256, 8192
    x = torch.randn(40, f, generator=gen)
    packed = K.hadamard_project_pack(x, K.hadamard_signs(f, d, seed=1), d)
    ham = K.hamming(packed, packed).double() / d
    cos = torch.nn.functional.normalize(x.double(), dim=1)
    angle = torch.arccos((cos @ cos.T).clamp(-1, 1)) / torch.pi
    assert (ham - angle).abs().max() < 0.05


@pytest.mark.parametrize("backend", [*FAST, "reference"])
def test_project_and_topk_is_the_composition(backend: str) -> None:
    gen = torch.Generator().manual_seed(9)
    f, d = 50, 200
    x = torch.randint(-2, 3, (3, f), generator=gen).float()
    signs = K.hadamard_signs(f, d, seed=2)
    mem = _packed(gen, 30, d)
    off = torch.tensor([0, 10, 30])
    dist, idx = K.project_and_topk(x, signs, mem, off, 3, dim=d, backend=backend)
    ref_q = reference.hadamard_project_pack(x, signs, d)
    ref_d, ref_i = reference.segmented_hamming_topk(ref_q, mem, off, 3)
    assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)
    w = (2 * torch.randint(0, 2, (d, f), generator=gen) - 1).float()
    dist, idx = K.project_and_topk(x, w, mem, off, 2, backend=backend)
    ref_d, ref_i = reference.segmented_hamming_topk(reference.sign_project_pack(x, w), mem, off, 2)
    assert torch.equal(dist, ref_d) and torch.equal(idx, ref_i)


def test_auto_uses_the_compiled_kernels_on_cpu() -> None:
    assert K.resolve_backend("auto", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp", "torch"])
def test_bad_inputs_raise_one_clear_error(backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    q, mem = _packed(gen, 2, 100), _packed(gen, 10, 100)
    off = torch.tensor([0, 4, 10])
    empty_q = q[:0]
    with pytest.raises(InputError, match="empty"):
        K.segmented_hamming_topk(empty_q, mem, off, 1, backend=backend)
    with pytest.raises(InputError, match="empty"):
        K.hamming(empty_q, mem, backend=backend)
    with pytest.raises(InputError, match="empty batch"):
        K.sign_project_pack(torch.zeros(0, 5), torch.ones(8, 5), backend=backend)
    with pytest.raises(InputError, match="empty batch"):
        K.hadamard_project_pack(torch.zeros(0, 5), K.hadamard_signs(5, 64), 64, backend=backend)
    with pytest.raises(InputError, match="empty"):
        K.segmented_cosine_max(torch.zeros(0, 5), torch.ones(3, 5), torch.tensor([0, 3]))
    with pytest.raises(InputError, match="int64"):
        K.hamming(q.int(), mem, backend=backend)
    with pytest.raises(InputError, match="words per row"):
        K.segmented_hamming_topk(q, mem[:, :1], off, 1, backend=backend)
    with pytest.raises(InputError, match="k must be"):
        K.segmented_hamming_topk(q, mem, off, 0, backend=backend)
    with pytest.raises(InputError, match="offsets must start"):
        K.segmented_hamming_topk(q, mem, torch.tensor([0, 4, 9]), 1, backend=backend)
    with pytest.raises(InputError, match="non-decreasing"):
        K.segmented_hamming_topk(q, mem, torch.tensor([0, 6, 4, 10]), 1, backend=backend)
    with pytest.raises(InputError, match="weight must be"):
        K.sign_project_pack(torch.ones(2, 5), torch.ones(8, 4), backend=backend)
    with pytest.raises(InputError, match="do not fit"):
        K.hadamard_project_pack(torch.ones(2, 100), K.hadamard_signs(50, 64), 64, backend=backend)


def test_unknown_or_unavailable_backend() -> None:
    q = reference.pack_bits(torch.randn(2, 10))
    with pytest.raises(InputError, match="unknown kernel backend"):
        K.hamming(q, q, backend="fortran")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            K.hamming(q, q, backend="cuda")
