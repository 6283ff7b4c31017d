"""The pipeline's stages and the public pooled verdict (cj.clair_groups, cj.pool_verdicts)."""

import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from clair_jax import detect, refine, stack
from clair_jax.options import ClairOptions


def _layers(seed=0, layers=4, **kw):
    cfg = dict(num_clients=16, p=12, q=4, rank=2, contamination=0.25, noise=0.1, kind="mixed")
    cfg.update(kw)
    fed = cj.data.make_federation(seed, **cfg)
    scales = jnp.linspace(0.5, 2.0, layers)[:, None, None, None]
    return fed, fed.updates[None] * scales


def test_groups_of_layers_equal_one_call_over_all_layers():
    fed, updates = _layers()
    whole = cj.clair(updates)
    # Groups of 2 layers, as elsewhere in this file: their programs compile once.
    first, second = cj.clair_groups([updates[:2], updates[2:]])
    for part in (first, second):
        np.testing.assert_array_equal(np.asarray(part.client_benign), np.asarray(whole.client_benign))
        np.testing.assert_allclose(np.asarray(part.client_z), np.asarray(whole.client_z), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(second.refined), np.asarray(whole.refined[2:]), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(whole.client_benign), np.asarray(fed.benign))


def test_one_group_is_clair():
    fed, _ = _layers()
    (res,) = cj.clair_groups([fed.updates])
    ref = cj.clair(fed.updates)
    np.testing.assert_array_equal(np.asarray(res.benign), np.asarray(ref.benign))
    np.testing.assert_allclose(np.asarray(res.refined), np.asarray(ref.refined))


def test_groups_of_different_shapes_and_kinds_share_one_verdict():
    fed, _ = _layers(1)
    rng = np.random.default_rng(1)
    # A LoRA group of another shape, with the same clients contaminated.
    k, r = fed.updates.shape[0], 2
    basis = np.linalg.qr(rng.standard_normal((20, 2)))[0]
    b = np.einsum("pr,krs->kps", basis, rng.standard_normal((k, 2, r)))
    bad = ~np.asarray(fed.benign)
    b[bad] = rng.standard_normal((bad.sum(), 20, r))
    lora = cj.LoRAFactors(jnp.asarray(b), jnp.asarray(rng.standard_normal((k, r, 6))))
    dense_res, lora_res = cj.clair_groups([fed.updates, lora])
    np.testing.assert_array_equal(np.asarray(dense_res.client_benign), np.asarray(lora_res.client_benign))
    np.testing.assert_array_equal(np.asarray(lora_res.client_benign), np.asarray(fed.benign))
    assert isinstance(lora_res.refined, cj.LoRAFactors) and lora_res.refined.B.shape == b.shape


def test_pool_verdicts_of_separate_results_equals_the_joint_verdict():
    fed, updates = _layers(2)
    joint = cj.clair_groups([updates[:2], updates[2:]])
    separate = [cj.clair(updates[:2]), cj.clair(updates[2:])]
    verdict = cj.pool_verdicts(separate)
    np.testing.assert_array_equal(np.asarray(verdict.benign), np.asarray(joint[0].client_benign))
    np.testing.assert_allclose(np.asarray(verdict.scores), np.asarray(joint[0].client_scores), rtol=1e-6)


def test_hosts_screening_their_own_layers_and_pooling_equal_one_process():
    # Client 0 is replaced by noise in layer 0 only: the host holding layers 2-3 calls
    # it benign on its own evidence; the verdict pooled over both hosts flags it.
    fed, updates = _layers()
    updates = np.array(updates)
    fake = np.random.default_rng(0).standard_normal(updates.shape[-2:])
    updates[0, 0] = fake * np.linalg.norm(updates[0, 0]) / np.linalg.norm(fake)
    updates = jnp.asarray(updates)
    whole = cj.clair(updates)
    hosts = [cj.screen([updates[:2]]), cj.screen([updates[2:]])]
    evidence = [jnp.concatenate(e) for e in zip(*(h.evidence() for h in hosts))]
    pooled = hosts[1].verdict(evidence)
    assert bool(hosts[1].verdict().benign[0]) and not bool(pooled.benign[0])   # the hosts disagree
    mine = [cj.conclude(h, pooled)[0] for h in hosts]
    for res in mine:
        np.testing.assert_array_equal(np.asarray(res.client_benign), np.asarray(whole.client_benign))
    np.testing.assert_allclose(np.concatenate([np.asarray(r.refined) for r in mine]), np.asarray(whole.refined),
                               rtol=1e-6, atol=1e-9)
    own = cj.conclude(hosts[1])[0]   # its own verdict refines client 0 as benign: not the joint answer
    assert bool(own.client_benign[0]) and not np.allclose(np.asarray(own.refined), np.asarray(whole.refined[2:]))
    with pytest.raises(ValueError, match="verdict"):
        cj.conclude(hosts[0], cj.pool.client_verdict(*(e[:, :3] for e in evidence)))
    with pytest.raises(TypeError, match="screening"):
        cj.conclude(whole)


def test_pool_verdict_rules():
    usable = jnp.ones((3, 4), bool)
    benign = jnp.array([[1, 1, 0, 1], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    scores = jnp.array([[0.0, 0.0, 0.9, 0.05]] * 3)
    z = jnp.array([[0.0, 0.0, 0.0, 0.0]] * 3)
    v = cj.pool.client_verdict(benign, scores, z, usable)
    assert v.benign.tolist() == [True, True, False, False]          # client 3 loses the vote
    v = cj.pool.client_verdict(jnp.ones((3, 4), bool), jnp.zeros((3, 4)), z.at[:, 1].set(7.0), usable)
    assert v.benign.tolist() == [True, False, True, True]           # mean z above z_crit
    v = cj.pool.client_verdict(jnp.ones((3, 4), bool), jnp.zeros((3, 4)), z, usable.at[1, 2].set(False))
    assert v.benign.tolist() == [True, True, False, True] and v.nonfinite.tolist() == [False, False, True, False]


def test_layer_threshold_grows_slowly_with_the_number_of_problems():
    assert cj.pool.layer_threshold(5.0, 1) == pytest.approx(10.0)
    assert cj.pool.layer_threshold(5.0, 6) == pytest.approx(2.0 * np.sqrt(25.0 + 2.0 * np.log(6.0)))
    assert refine.DECISIVE_Z < cj.pool.layer_threshold(5.0, 2) < cj.pool.layer_threshold(5.0, 128) < 12.0


def test_pool_flags_a_client_decisive_in_one_problem_of_six():
    # Client 1 is flagged in one problem of six (z 15) and clean elsewhere: its mean
    # z (2.5) and the vote clear it, its largest z (above 10.7 for n = 6) does not.
    usable = jnp.ones((6, 4), bool)
    z = jnp.zeros((6, 4)).at[:, 3].set(1.5)
    benign = jnp.ones((6, 4), bool).at[2, 1].set(False)
    scores = jnp.zeros((6, 4))
    v = cj.pool.client_verdict(benign, scores, z.at[2, 1].set(15.0), usable)
    assert v.benign.tolist() == [True, False, True, True]
    assert float(v.z[1]) == pytest.approx(2.5)
    # z 9 in one problem (below the corrected threshold) is not enough on its own.
    v = cj.pool.client_verdict(benign, scores, z.at[2, 1].set(9.0), usable)
    assert v.benign.tolist() == [True, True, True, True]
    # A problem where the client is not usable does not count (it is flagged as non-finite instead).
    v = cj.pool.client_verdict(jnp.ones((6, 4), bool), scores, z.at[2, 0].set(jnp.nan), usable.at[2, 0].set(False))
    assert v.benign.tolist() == [False, True, True, True] and v.nonfinite.tolist() == [True, False, False, False]
    # With one problem the problem's own verdict is the client's: no extra rule.
    v = cj.pool.client_verdict(benign[:1], scores[:1], z[:1].at[0, 1].set(15.0), usable[:1])
    assert v.benign.tolist() == [True, True, True, True]


def test_groups_errors_name_the_group():
    fed, _ = _layers()
    with pytest.raises(ValueError, match="same clients"):
        cj.clair_groups([fed.updates, fed.updates[:10]])
    with pytest.raises(TypeError, match=r"groups\[1\]"):
        cj.clair_groups([fed.updates, fed.updates.astype(jnp.int32)])
    with pytest.raises(TypeError, match="list or tuple"):
        cj.clair_groups(fed.updates)
    with pytest.raises(ValueError, match="at least one"):
        cj.clair_groups([])
    res = cj.clair(fed.updates)
    fewer = res._replace(client_benign=res.client_benign[:10])   # a result of 10 clients, without solving one
    with pytest.raises(ValueError, match="same clients"):
        cj.pool_verdicts([res, fewer])


def test_stages_compose_to_clair():
    fed, updates = _layers(3, layers=2)
    opts = ClairOptions.checked()
    problems = stack.problems(updates, "left")
    detection = detect.until_settled(problems, opts)
    verdict = cj.pool.client_verdict(detection.benign, detection.scores, detection.z, detection.usable)
    refined = refine.refine(problems, detection, verdict.benign)
    ref = cj.clair(updates)
    np.testing.assert_allclose(np.asarray(problems.restore(refined.refined)), np.asarray(ref.refined))
    assert detection.passes >= 1 and refined.rank.shape == (2,)


def test_refinement_reuses_the_detections_svd_only_for_its_own_set():
    # LoRA factors with a partial-SVT budget: the detection hands its final set's SVD on.
    rng = np.random.default_rng(5)
    k, d, r, modules = 12, 96, 2, 2
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0]
    b = np.einsum("dr,mkrs->mkds", basis, rng.standard_normal((modules, k, r, r)))
    b += 0.05 * rng.standard_normal(b.shape) / np.sqrt(d)
    b[:, :2] = rng.standard_normal((modules, 2, d, r)) / np.sqrt(d)       # two off-subspace clients
    a = rng.standard_normal((modules, k, r, d)) / np.sqrt(d)
    factors = cj.LoRAFactors(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32))
    problems = stack.problems(factors, "left")
    detection = detect.until_settled(problems, ClairOptions.checked(svt="partial"))
    assert detection.svd is not None and 0 < detection.svd.u.shape[-1] < detection.svd.s.shape[-1]
    np.testing.assert_array_equal(np.asarray(detection.svd.members), np.asarray(detection.benign))
    verdict = cj.pool.client_verdict(detection.benign, detection.scores, detection.z, detection.usable)
    assert not np.asarray(verdict.benign)[:2].any() and np.asarray(verdict.benign)[2:].all()
    # The pooled verdict's set, and another one (client 2 left out): both agree with a fresh SVD.
    for benign in (verdict.benign, verdict.benign.at[2].set(False)):
        reused = refine.refine(problems, detection, benign)
        fresh = refine.refine(problems, detection._replace(svd=None), benign)
        np.testing.assert_array_equal(np.asarray(reused.rank), np.asarray(fresh.rank))
        np.testing.assert_allclose(np.asarray(reused.refined.B), np.asarray(fresh.refined.B), atol=1e-5)
        projector = [np.einsum("npr,nqr->npq", u, u) for u in (np.asarray(reused.subspace), np.asarray(fresh.subspace))]
        np.testing.assert_allclose(*projector, atol=1e-4)


def test_second_call_does_not_recompile():
    fed, _ = _layers(4)
    cj.clair(fed.updates)
    before = detect._pass_all._cache_size()
    cj.clair(fed.updates * 3.0)
    assert detect._pass_all._cache_size() == before



def test_a_call_whose_rank_differs_compiles_nothing():
    """Û's widths (the cap on r̂, the largest r̂) are static but bucketed: same shapes, another r̂, no program."""
    import warnings

    import jax

    # p = 16: r̂ = 3 stays below a fifth of the stack's short side (a crowded problem
    # runs programs of its own, compiled the first time one is met).
    feds = [cj.data.make_federation(seed, num_clients=16, p=16, q=4, rank=rank, contamination=0.25, noise=0.05,
                                    kind="mixed") for seed, rank in ((1, 1), (3, 3))]
    compiles = []

    def listener(event, seconds, **kw):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    first = cj.clair(feds[0].updates)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)    # not crowded
            second = cj.clair(feds[1].updates)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert (int(first.rank), int(second.rank)) == (1, 3)
    assert compiles == []


GOOD = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 3)))


@pytest.mark.parametrize("updates, kwargs, match", [
    (GOOD, dict(rank=16), "rank = 16 is larger"),
    (jnp.zeros((0, 6, 5, 3)), {}, "empty leading"),
    (cj.LoRAFactors(jnp.zeros((6, 5, 0)), jnp.zeros((6, 0, 3))), {}, "LoRA rank 0"),
    ((GOOD[..., :2], GOOD[:, :2, :]), {}, "cj.LoRAFactors"),
    (GOOD, dict(lam=[0.5, 0.7]), "lam must be a single"),
    (GOOD, dict(noise=None), "noise must be 'auto'"),
    (GOOD, dict(noise=[0.1]), "noise must be a single"),
    (GOOD, dict(threshold="0.5"), "threshold must be a single"),
    (GOOD, dict(tol="abc"), "tol must be a single"),
    (GOOD, dict(min_gap="x"), "min_gap must be a single"),
    (GOOD, dict(svt="fast"), "svt must be one of"),
    (GOOD, dict(refit="yes"), "refit must be True or False"),
])
def test_bad_input_names_the_argument(updates, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        cj.clair(updates, **kwargs)
