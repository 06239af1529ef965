"""The shipped demo model card is what scripts/train_demo_model.py writes (no drift)."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_card_has_the_scripts_text_and_sections():
    template = _script().MODEL_CARD
    card = (ROOT / "napari_diffmix" / "resources" / "models" / "demo" / "MODEL_CARD.md").read_text()
    # Headings: the template's, in its order (a {wide_size} heading is the 256 px one).
    headings = [h.replace("{wide_size}", "256") for h in re.findall(r"^#+ .*$", template, re.M)]
    assert re.findall(r"^#+ .*$", card, re.M) == headings
    # Every line of the template without a measured value is in the card word for word.
    for line in template.splitlines():
        if "{" not in line and line.strip():
            assert line in card.splitlines(), line


def test_the_256_px_section_is_worded_from_the_reports():
    from napari_diffmix.quality import QualityReport

    words = _script().in_words(QualityReport(3.2214, 2.63, 7.56, 7.31, 4.68, 6.41, 4, 411, 0.0012, 0.0))
    assert words == ("hematoxylin contrast 3.22 (real 2.63: 1.22 x), ring DAB ratio 7.56 (real 7.31), "
                     "high-frequency noise 4.68 (real 6.41: 0.73 x), off-stain pixels 0.12% (real 0.00%): PASS (411 nuclei)")
    card = (ROOT / "napari_diffmix" / "resources" / "models" / "demo" / "MODEL_CARD.md").read_text()
    number = r"\d+(?:\.\d+)?"
    pattern = re.sub(r"\d+(?:\\\.\d+)?", lambda _: number, re.escape(words))  # any figures, the same words
    assert len(re.findall(pattern, card)) == 2  # the tile's windows and the held-out ones
