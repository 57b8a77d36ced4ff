"""CLIP's tokenizer in both folder layouts (tokenizer.json as today's transformers writes it;
vocab.json + merges.txt as published Stable Diffusion folders hold it) gives transformers'
CLIPTokenizer ids for prompts with unicode, whitespace, punctuation, special tokens,
truncation and padding (tests/fixtures/make_sd_pipelines.py)."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffusion_jax.models.clip_tokenizer import CLIPTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FOLDERS = {"sd15": FIXTURES / "tiny_sd15" / "tokenizer", "sd2": FIXTURES / "tiny_sd2" / "tokenizer"}


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "clip_tokens.npz"))


@pytest.mark.parametrize("layout", ["sd15", "sd2"])
def test_ids_equal_transformers_clip_tokenizer(reference, layout):
    files = sorted(p.name for p in FOLDERS[layout].iterdir())
    expected_files = {
        "sd15": ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"],
        "sd2": ["tokenizer.json", "tokenizer_config.json"],
    }[layout]
    assert files == expected_files
    prompts = [str(p) for p in reference["prompts"]]
    assert len(prompts) >= 20
    ours = CLIPTokenizer.from_folder(FOLDERS[layout])(prompts)
    theirs = reference[layout]
    for prompt, a, b in zip(prompts, ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=repr(prompt))
    # The references exercise what they claim: cut prompts ending in the end token, padded
    # ones, and 2.x's padding with "!" (id 33 in a byte-level vocabulary) against v1.x's
    # padding with the end token.
    tokenizer = CLIPTokenizer.from_folder(FOLDERS[layout])
    cut = [i for i, p in enumerate(prompts) if len(tokenizer.encode(p)) > 75]
    assert len(cut) >= 2 and all(theirs[i, -1] == tokenizer.eos_id for i in cut)
    assert (theirs[:, -1] == tokenizer.pad_id).sum() >= 10
    assert tokenizer.pad_id == (33 if layout == "sd2" else tokenizer.eos_id)


def test_the_two_layouts_of_one_vocabulary_agree(tmp_path, reference):
    """The same vocabulary and merges in both files give the same ids (the fixtures' special
    tokens differ only in padding, which is rewritten here)."""
    folder = tmp_path / "tok"
    shutil.copytree(FOLDERS["sd2"], folder)
    config = (folder / "tokenizer_config.json").read_text().replace('"!"', '"<|endoftext|>"')
    (folder / "tokenizer_config.json").write_text(config)
    prompts = [str(p) for p in reference["prompts"] if "!" not in str(p)]
    fast = CLIPTokenizer.from_folder(folder)(prompts)
    legacy = CLIPTokenizer.from_folder(FOLDERS["sd15"])(prompts)
    np.testing.assert_array_equal(fast, legacy)


def test_a_folder_without_tokenizer_files_names_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
