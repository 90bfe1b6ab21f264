"""LLaVA JSON loader: round trip, placeholder handling, every bad-input case."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sim.data import DataError, VQAExample, generate_synthetic_vqa, load_examples, load_llava_json, write_llava_json


def _multi_turn() -> VQAExample:
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[4:12, 20:28] = (200, 10, 10)
    turns = (("what is in the picture?", "a red square"), ("where is it?", "top right"), ("is it big?", "no"))
    return VQAExample(img, turns, "llava")


def test_round_trip(tmp_path):
    examples = generate_synthetic_vqa(6, seed=0, image_size=32) + [_multi_turn()]
    path = write_llava_json(examples, tmp_path / "set")
    records = json.loads(path.read_text())
    assert all(not Path(r["image"]).is_absolute() for r in records)
    assert records[-1]["conversations"][0]["value"].startswith("<image>\n")
    assert len(records[-1]["conversations"]) == 6

    loaded, skipped = load_llava_json(path, image_size=32)
    assert skipped == 0 and len(loaded) == len(examples)
    for a, b in zip(examples, loaded):
        assert np.array_equal(a.image, b.image)
        assert a.turns == b.turns and a.qtype == b.qtype
        assert all("<image>" not in h for h, _ in b.turns)
    assert loaded[-1].answer == "no" and len(loaded[-1].turns) == 3


def test_resize_and_rgb_conversion(tmp_path):
    Image.fromarray(np.full((40, 20), 128, dtype=np.uint8), mode="L").save(tmp_path / "grey.png")
    Image.new("RGBA", (10, 30), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    recs = [
        {"id": "g", "image": "grey.png", "conversations": [
            {"from": "human", "value": "What colour?\n<image>"}, {"from": "gpt", "value": " grey "}]},
        {"id": "r", "image": str((tmp_path / "rgba.png").resolve()), "type": "colour", "conversations": [
            {"from": "human", "value": "Is this <image> red?"}, {"from": "gpt", "value": "yes"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    ex, skipped = load_llava_json(tmp_path / "d.json", image_size=24)
    assert skipped == 0
    for e in ex:
        assert e.image.shape == (24, 24, 3) and e.image.dtype == np.uint8
    assert ex[0].turns == (("What colour?", "grey"),) and ex[0].qtype == "llava"
    assert (ex[0].image == 128).all()
    assert ex[1].turns == (("Is this red?", "yes"),) and ex[1].qtype == "colour"
    assert (ex[1].image[..., 0] == 255).all()


def _write_case(tmp_path: Path, bad: object, make_files=None) -> Path:
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "ok.png")
    good = {"id": "good", "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}]}
    if make_files:
        make_files(tmp_path)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, bad]))
    return path


def _conv(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def _corrupt(d: Path):
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")


def _truncated(d: Path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])


OK = _conv(("human", "<image>\nq?"), ("gpt", "a"))
BAD_RECORDS = {
    "missing image file": ({"id": "bad", "image": "nope.png", "conversations": OK}, None, "does not exist"),
    "corrupt image": ({"id": "bad", "image": "corrupt.png", "conversations": OK}, _corrupt, "cannot read image"),
    "truncated image": ({"id": "bad", "image": "trunc.png", "conversations": OK}, _truncated, "cannot read image"),
    "no image": ({"id": "bad", "conversations": OK}, None, "no 'image'"),
    "empty image": ({"id": "bad", "image": "", "conversations": OK}, None, "no 'image'"),
    "no conversations": ({"id": "bad", "image": "ok.png"}, None, "no 'conversations'"),
    "empty conversations": ({"id": "bad", "image": "ok.png", "conversations": []}, None, "non-empty list"),
    "conversations not a list": ({"id": "bad", "image": "ok.png", "conversations": "hi"}, None, "non-empty list"),
    "gpt first": ({"id": "bad", "image": "ok.png", "conversations": _conv(("gpt", "a"), ("human", "q"))},
                  None, "alternate"),
    "two humans": ({"id": "bad", "image": "ok.png",
                    "conversations": _conv(("human", "q"), ("human", "q"), ("gpt", "a"))}, None, "alternate"),
    "ends with human": ({"id": "bad", "image": "ok.png",
                         "conversations": _conv(("human", "q"), ("gpt", "a"), ("human", "q2"))}, None, "ends with"),
    "turn without value": ({"id": "bad", "image": "ok.png", "conversations": [{"from": "human"}]},
                           None, "'value'"),
    "empty answer": ({"id": "bad", "image": "ok.png", "conversations": _conv(("human", "q"), ("gpt", "  "))},
                     None, "empty"),
    "record not an object": (["bad", "ok.png"], None, "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_error_mode(tmp_path, case):
    bad, make, why = BAD_RECORDS[case]
    path = _write_case(tmp_path, bad, make)
    with pytest.raises(DataError) as err:
        load_llava_json(path, image_size=8, on_bad_record="error")
    msg = str(err.value)
    assert str(path) in msg and "record 1" in msg and why in msg
    if isinstance(bad, dict):
        assert "'bad'" in msg


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_skip_mode(tmp_path, case, caplog):
    bad, make, why = BAD_RECORDS[case]
    path = _write_case(tmp_path, bad, make)
    with caplog.at_level(logging.WARNING, logger="sim.data.llava_json"):
        ex, skipped = load_llava_json(path, image_size=8, on_bad_record="skip")
    assert skipped == 1 and len(ex) == 1 and ex[0].answer == "a"
    assert any("record 1" in r.getMessage() and why in r.getMessage() for r in caplog.records)


FILE_LEVEL = {
    "missing json": (None, "does not exist"),
    "invalid json": ("[{\"id\": 1,", "invalid JSON"),
    "not a list": (json.dumps({"id": 1, "image": "x.png"}), "JSON list"),
}


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("case", sorted(FILE_LEVEL))
def test_file_level_errors_raise_in_both_modes(tmp_path, case, mode):
    text, why = FILE_LEVEL[case]
    path = tmp_path / "data.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=why) as err:
        load_llava_json(path, image_size=8, on_bad_record=mode)
    assert str(path) in str(err.value)


def test_invalid_policy(tmp_path):
    with pytest.raises(ValueError, match="on_bad_record"):
        load_llava_json(tmp_path / "x.json", image_size=8, on_bad_record="ignore")


def test_load_examples_llava_and_cache(tmp_path):
    path = write_llava_json(generate_synthetic_vqa(5, seed=2, image_size=16), tmp_path)
    a = load_examples("llava-json", str(path), 16, num_samples=99, seed=0)
    b = load_examples("llava-json", str(path), 16, num_samples=99, seed=0)
    assert a is not b and len(a) == 5 and all(x is y for x, y in zip(a, b))  # cached, fresh list
    a.clear()
    assert len(load_examples("llava-json", str(path), 16, num_samples=99, seed=0)) == 5


def test_load_examples_all_bad_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "x", "conversations": OK}]))
    with pytest.raises(DataError, match="no usable records"):
        load_examples("llava-json", str(path), 8, 10, 0, on_bad_record="skip")


def test_load_examples_validation():
    with pytest.raises(ValueError, match="'dataset'.*synthetic.*llava-json"):
        load_examples("coco", "", 32, 10, 0)
    with pytest.raises(ValueError, match="data-path"):
        load_examples("llava-json", "", 32, 10, 0)
    syn = load_examples("synthetic", "ignored.json", 16, 12, 4)
    assert len(syn) == 12 and syn[0].image.shape == (16, 16, 3)
    assert load_examples("synthetic", "", 16, 12, 4)[0] is syn[0]


# ----------------------------------------------------------------------------- paths outside the dataset folder
def _escape_case(tmp_path: Path, image_ref) -> Path:
    """``set/data.json`` with a good record (a nested subfolder) and record 1 naming ``image_ref``;
    ``secret.png`` lies outside ``set/``."""
    root = tmp_path / "set"
    (root / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "images" / "a" / "ok.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "secret.png")
    recs = [{"id": "good", "image": "images/a/ok.png", "conversations": OK},
            {"id": "esc", "image": image_ref(root) if callable(image_ref) else image_ref, "conversations": OK}]
    path = root / "data.json"
    path.write_text(json.dumps(recs))
    return path


def _linked(root: Path) -> str:
    (root / "images" / "link.png").symlink_to(root.parent / "secret.png")
    return "images/link.png"


def _linked_dir(root: Path) -> str:
    (root / "images" / "outside").symlink_to(root.parent, target_is_directory=True)
    return "images/outside/secret.png"


ESCAPES = {
    "relative ..": "../secret.png",
    "deep relative ..": "images/a/../../../secret.png",
    "absolute elsewhere": lambda root: str(root.parent / "secret.png"),
    "system file": "../../../../../../../../etc/passwd",
    "symlinked file": _linked,
    "symlinked folder": _linked_dir,
}


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_image_path_outside_the_folder_is_refused_in_both_modes(tmp_path, case, mode):
    path = _escape_case(tmp_path, ESCAPES[case])
    ref = json.loads(path.read_text())[1]["image"]
    with pytest.raises(DataError) as err:
        load_llava_json(path, image_size=8, on_bad_record=mode)
    msg = str(err.value)
    assert str(path) in msg and "record 1 (id='esc')" in msg and repr(ref) in msg
    assert "outside the dataset folder" in msg and "data-allow-outside-paths" in msg


@pytest.mark.parametrize("case", sorted(set(ESCAPES) - {"system file"}))
def test_allow_outside_paths_loads_them(tmp_path, case):
    path = _escape_case(tmp_path, ESCAPES[case])
    ex, skipped = load_llava_json(path, image_size=8, allow_outside_paths=True)
    assert skipped == 0 and len(ex) == 2
    assert (ex[0].image == (0, 255, 0)).all() and (ex[1].image == 9).all()


def test_nested_and_absolute_paths_inside_the_folder_still_load(tmp_path):
    path = _escape_case(tmp_path, lambda root: str(root / "images" / "a" / "ok.png"))
    recs = json.loads(path.read_text())
    recs.append({"id": "dots", "image": "images/a/../a/./ok.png", "conversations": OK})
    path.write_text(json.dumps(recs))
    ex, skipped = load_llava_json(path, image_size=8)
    assert skipped == 0 and len(ex) == 3 and all((e.image == (0, 255, 0)).all() for e in ex)


def test_a_symlinked_dataset_folder_is_its_own_inside(tmp_path):
    real = _escape_case(tmp_path, "images/a/ok.png").parent
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    ex, _ = load_llava_json(tmp_path / "alias" / "data.json", image_size=8)
    assert len(ex) == 2


def test_the_run_config_key_reaches_the_loader(tmp_path):
    path = _escape_case(tmp_path, "../secret.png")
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_examples("llava-json", str(path), 8, 10, 0, on_bad_record="skip")
    assert len(load_examples("llava-json", str(path), 8, 10, 0, allow_outside_paths=True)) == 2
    from sim.config import SplitConfig

    cfg = SplitConfig.from_run_config({"dataset": "llava-json", "data-path": str(path)})
    assert cfg.data_allow_outside_paths is False
    assert SplitConfig.from_run_config({"data-allow-outside-paths": "true"}).data_allow_outside_paths is True
