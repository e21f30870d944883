"""The Hugging Face Space card (README's YAML header), read with huggingface_hub as the Hub reads it,
checked against requirements.txt and app.py; then `python app.py` started the way a Space starts it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests
from huggingface_hub import SpaceCard, SpaceHardware
from packaging.requirements import Requirement

from app_helpers import AppProcess
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
TESTED_PYTHONS = {"3.11", "3.12", "3.13"}


def card_data() -> dict:
    return SpaceCard.load(ROOT / "README.md").data.to_dict()


def requirement(name: str) -> Requirement:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"{name} is not in requirements.txt")


def test_space_card_starts_app_py_on_the_pinned_gradio():
    card = card_data()
    assert card["sdk"] == "gradio"
    assert (ROOT / card["app_file"]).is_file() and card["app_file"] == "app.py"
    # the Space installs exactly this Gradio, then requirements.txt: it must be a version that allows
    assert re.fullmatch(r"\d+\.\d+\.\d+", card["sdk_version"]), card["sdk_version"]
    assert requirement("gradio").specifier.contains(card["sdk_version"]), (card["sdk_version"], requirement("gradio"))
    assert requirement("fastrtc").specifier.contains("0.0.34")  # fastrtc 0.0.34 needs gradio<6
    assert str(card["python_version"]) in TESTED_PYTHONS
    for key in ("title", "emoji", "colorFrom", "colorTo"):  # the Hub refuses a card without these
        assert card.get(key), key


def test_space_card_hardware_and_models():
    from agent.config import DEFAULT_GPU_MODEL

    card = card_data()
    flavours = {h.value for h in SpaceHardware}
    assert card["suggested_hardware"] in flavours, sorted(flavours)
    assert not card["suggested_hardware"].startswith("cpu"), "the suggestion is for real weights: a GPU"
    assert DEFAULT_GPU_MODEL in card["models"]
    assert card["license"] == "mit" and "MIT" in (ROOT / "LICENSE").read_text()
    assert len(card["short_description"]) <= 60  # the Hub's limit
    # the README section names what the free CPU tier runs, and every setting the card's readers need
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## On a Hugging Face Space"):]
    section = section[:section.index("\n## ", 5)]
    assert "tiny random-weight model" in section and "noise" in section
    for name in ("HF_TOKEN", "AGENT_AUTH", "TURN_URLS", "TURN_USERNAME", "TURN_CREDENTIAL"):
        assert name in section, name


@pytest.mark.slow
def test_space_start_serves_the_page_from_the_environment(tmp_path):
    """A Space runs `python app.py` with no flags: host and port from GRADIO_SERVER_NAME/PORT, the rest
    from variables; without a GPU the tiny model, said on the page."""
    port = free_port()
    env = dict(os.environ, SPACE_ID="someone/telugu-voice-agent", GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_SERVER_PORT=str(port), AGENT_MAX_SESSIONS="1", AGENT_DRAIN_SECONDS="1",
               NO_TORCH_COMPILE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.pop("AGENT_MODEL", None)
    env.pop("AGENT_PORT", None)
    app = AppProcess([], cwd=ROOT, env=env)
    try:
        assert app.wait_for("Uvicorn running", timeout=240), app.output[-3000:]
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert health["models"] == ["tiny"] and health["random_weights"] and health["seats_total"] == 1
        assert "Demo mode: random-weight model" in requests.get(f"http://127.0.0.1:{port}/config", timeout=10).text
    finally:
        code = app.stop()
    assert code == 0, app.output[-3000:]
