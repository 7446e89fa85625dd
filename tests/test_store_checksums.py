"""Bit rot in a latent store: every chunk's checksum is verified when it is read, the damaged shard is named with
the repair, `--verify` re-encodes exactly the damaged shards, and stores made before checksums keep working and
get them from preparation/add_checksums.py without re-encoding (also when killed at any step).

The reference is an undamaged store made by the same command, compared array by array. Damage is one flipped
byte inside a shard file's compressed data (the fault trial flipped 16; one is the harder case). Without the
checksums the same flip reads back as other numbers with no error: `test_..._without_checksums_...` shows it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from fcdm_common.cli import UserError, run_main
from preparation import add_checksums, checksums, extract_features, latent_stats, save_zarr
from preparation import store as zstore
from preparation.readers import open_dataset
from test_store_faults import (
    assert_same_store,
    contents,
    convert_args,
    exit_2_line,
    extract_args,
    kill_each,
    leftovers,
    make_images,
    shard_file,
    write_npy,
)


def flip_byte(f: Path, offset: int = 12) -> None:
    """Flip every bit of one byte inside the file's first compressed chunk (not its header, not the index)."""
    data = bytearray(f.read_bytes())
    data[offset] ^= 0xFF
    f.write_bytes(bytes(data))


def image_shard_file(store: Path, k: int) -> Path:
    files = [p for p in (store / "images" / "c" / str(k)).rglob("*") if p.is_file()]
    assert len(files) == 1
    return files[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """An image folder, and an undamaged reference store (with alignment images) extracted from it."""
    root = tmp_path_factory.mktemp("checksums")
    images = make_images(root / "imgs")
    ref = root / "ref.zarr"
    run_main(extract_features.main, extract_args(images, ref, "--repa-image-size", 8))
    return images, ref


@pytest.mark.parametrize("array", ["latents", "labels", "images"])
def test_a_flipped_byte_stops_the_reader_naming_the_shard_and_verify_re_encodes_it(stores, tmp_path, capsys, array):
    from test_train import TINY
    from train_gen import train

    images, ref = stores
    out = tmp_path / "o.zarr"
    shutil.copytree(ref, out)
    flip_byte(image_shard_file(out, 1) if array == "images" else shard_file(out, array, 1))
    if array == "images":
        ds = open_dataset(zarr_path=out, images=True, cache="none")
        ds.get_batch(np.array([0, 1, 4]), np.random.default_rng(0))  # shards 0 and 2 read fine
        with pytest.raises(UserError) as e:
            ds.get_batch(np.array([0, 2]), np.random.default_rng(0))  # the flip is in image 2
    else:
        with pytest.raises(UserError) as e:
            open_dataset(zarr_path=out, cache="memory").prepare()
    msg = str(e.value)
    assert str(out) in msg and "1 shard(s) fail their checksum (shard 1 (images 2..3))" in msg and "--verify" in msg
    if array != "images":  # training stops with the same one line
        err = exit_2_line(train.main, TINY + ["--zarr-path", str(out), "--results-dir", str(tmp_path / "res"),
                                              "--max-train-steps", "1", "--global-batch-size", "2"], capsys)
        assert err == f"error: {msg}"
    run_main(extract_features.main, extract_args(images, out))  # without --verify: nothing is read back
    assert "nothing to do (--verify checks" in capsys.readouterr().out
    run_main(extract_features.main, extract_args(images, out, "--verify"))  # the repair the message names
    said = capsys.readouterr().out
    what = "images of shard 1 (images 2..3)" if array == "images" else "latents or labels of shard 1 (images 2..3)"
    assert f"the {what} fail to read back (damaged)" in said
    assert_same_store(out, ref)
    run_main(extract_features.main, extract_args(images, out, "--verify"))
    assert "every stored shard reads back intact" in capsys.readouterr().out


def test_save_zarr_verify_converts_a_damaged_shard_again_and_latent_stats_names_it(tmp_path, capsys):
    feats, labels = write_npy(tmp_path)
    ref, out = tmp_path / "ref.zarr", tmp_path / "o.zarr"
    run_main(save_zarr.main, convert_args(feats, labels, ref))
    run_main(save_zarr.main, convert_args(feats, labels, out))
    flip_byte(shard_file(out, "latents", 2))
    err = exit_2_line(latent_stats.main, [str(out), "--recompute"], capsys)
    assert "shard 2 (images 4..5)" in err and "fail their checksum" in err
    run_main(save_zarr.main, convert_args(feats, labels, out, "--verify"))
    assert "shard 2 (images 4..5) fail to read back (damaged); converting them again" in capsys.readouterr().out
    assert_same_store(out, ref)


@pytest.fixture(scope="module")
def old_store(stores, tmp_path_factory):
    """The store as the writer made it before checksums: blosc only (the same extraction otherwise)."""
    images, ref = stores
    out = tmp_path_factory.mktemp("old") / "old.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zstore, "data_compressors", lambda: (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),))
        run_main(extract_features.main, extract_args(images, out, "--repa-image-size", 8))
    group = zarr.open_group(str(out), mode="r")
    assert checksums.missing_checksums(group) == ["latents", "labels", "images"]
    return out


def test_without_checksums_a_flipped_byte_reads_as_other_numbers_and_the_reader_says_so(old_store, tmp_path):
    """The defect itself (still true of an old store): no error, other values. The reader notes the missing
    checksums once, and everything else works as before."""
    rotten = tmp_path / "rotten.zarr"
    shutil.copytree(old_store, rotten)
    flip_byte(shard_file(rotten, "latents", 1), offset=40)
    clean, bad = (open_dataset(zarr_path=p, cache="memory") for p in (old_store, rotten))
    for ds in (clean, bad):
        ds.prepare()
    assert not np.array_equal(clean._memory, bad._memory)  # read without any error
    assert "add_checksums.py" in bad.checksum_note and str(rotten) in bad.checksum_note
    from test_train import TINY, run_train

    copy = shutil.copytree(old_store, tmp_path / "c.zarr")
    run_train(TINY + ["--zarr-path", copy, "--results-dir", tmp_path / "res", "--max-train-steps", 1,
                           "--global-batch-size", 2, "--sample-every", 0])  # trains as before, and says so once
    log = (next((tmp_path / "res").iterdir()) / "log.txt").read_text()
    assert log.count(f"note: {copy} was written before stores carried checksums") == 1


def test_add_checksums_keeps_every_value_and_then_finds_bit_rot(old_store, stores, tmp_path, capsys):
    _, ref = stores
    out = tmp_path / "o.zarr"
    shutil.copytree(old_store, out)
    before = contents(out)
    run_main(add_checksums.main, [str(out)])
    after = contents(out)
    assert after.keys() == before.keys() and after["attrs"] == before["attrs"]
    for name in before:
        if name != "attrs":
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    group = zarr.open_group(str(out), mode="r")
    assert checksums.missing_checksums(group) == [] and open_dataset(zarr_path=out).checksum_note is None
    # the same files as a store written with checksums (values, codecs; only `source` differs)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(ref) for p in ref.rglob("*"))
    run_main(add_checksums.main, [str(out)])
    assert "already carries checksums; nothing to do" in capsys.readouterr().out
    flip_byte(shard_file(out, "latents", 2))
    with pytest.raises(UserError, match=r"shard 2 \(images 4\.\.5\)"):
        open_dataset(zarr_path=out, cache="memory").prepare()


def test_add_checksums_killed_at_any_step_finishes_on_rerun(old_store, tmp_path):
    specs = ["store-meta/latents.checksummed/zarr.json:1", "store-data/latents.checksummed/*:2",
             "store-meta/checksums-copied:1", "store-meta/checksums-aside:1", "store-meta/checksums-renamed:2",
             "store-data/images.checksummed/*:1"]
    copies = {spec: shutil.copytree(old_store, tmp_path / f"k{i}.zarr") for i, spec in enumerate(specs)}
    kill_each(add_checksums.__file__, lambda spec: [str(copies[spec])], specs)
    want = contents(old_store)
    for spec, path in copies.items():
        add_checksums.add_checksums(path, say=lambda m: None)
        got = contents(path)
        assert got.keys() == want.keys(), spec
        for name in want:
            if name != "attrs":
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{spec}: {name}")
        assert not checksums.missing_checksums(zarr.open_group(str(path), mode="r")), spec
        assert not leftovers(path) and not [p for p in path.iterdir() if "checksummed" in p.name], spec


def test_add_checksums_refuses_what_is_not_a_store(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert "is not an FCDM latent store" in exit_2_line(add_checksums.main, [str(tmp_path / "x")], capsys)
