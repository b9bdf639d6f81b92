"""`zhiyi engine install argos`: the model file checks, the library boundary, the messages.

Models cannot be downloaded here and argostranslate's own dependencies (CTranslate2,
SentencePiece, Stanza) are not in the test environment, so the tests stop at the
library's ``install_from_path``: a tiny real ``.argosmodel`` zip is built and checked,
and what a user reads when the library or a pair is missing is asserted.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import engines
from engines import EngineError, EngineSettings, check_argos_model
from zhiyi_server import main


def argos_model(folder: Path, source: str = "en", target: str = "de",
                kind: str = "translate") -> Path:
    """A minimal package in argostranslate's format: one folder with metadata.json."""
    path = folder / f"translate-{source}_{target}.argosmodel"
    metadata = {"package_version": "1.0", "argos_version": "1.0", "from_code": source,
                "to_code": target, "type": kind, "from_name": source, "to_name": target}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"translate-{source}_{target}-1_0/metadata.json", json.dumps(metadata))
        archive.writestr(f"translate-{source}_{target}-1_0/model/model.bin", b"\0" * 16)
    return path


def test_a_model_file_for_the_pair_passes_and_others_say_what_they_are(tmp_path) -> None:
    model = argos_model(tmp_path)
    assert check_argos_model(model, "en", "de")["to_code"] == "de"
    with pytest.raises(EngineError, match="for en to de, not a translation model for en to fr"):
        check_argos_model(model, "en", "fr")
    with pytest.raises(EngineError, match="sbd model"):
        check_argos_model(argos_model(tmp_path, kind="sbd"), "en", "de")
    not_zip = tmp_path / "x.argosmodel"
    not_zip.write_bytes(b"plain text")
    with pytest.raises(EngineError, match="zip archive"):
        check_argos_model(not_zip, "en", "de")
    empty = tmp_path / "empty.argosmodel"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(EngineError, match=r"metadata\.json"):
        check_argos_model(empty, "en", "de")


@pytest.mark.skipif(engines._argos() is not None,
                    reason="argostranslate is installed: this checks the message without it")
def test_cli_install_names_what_is_missing(tmp_path, capsys) -> None:
    model = argos_model(tmp_path)
    assert main(["engine", "install", "argos", "en", "fr", "--file", str(model)]) == 1
    assert "not a translation model for en to fr" in capsys.readouterr().err
    # A good file reaches the library boundary: without argostranslate, how to get it.
    assert main(["engine", "install", "argos", "en", "de", "--file", str(model)]) == 1
    assert "pip install 'zhiyi[argos]'" in capsys.readouterr().err
    assert main(["engine", "install", "argos", "EN", "DE"]) == 1
    assert "pip install 'zhiyi[argos]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["engine", "install", "nllb", "en", "de"])


async def test_a_missing_pair_names_the_install_command() -> None:
    """The engine reached with a language pair it has no model for."""
    english = SimpleNamespace(code="en", get_translation=lambda other: None)
    argos = SimpleNamespace(
        translate=SimpleNamespace(get_installed_languages=lambda: [english]),
        package=SimpleNamespace(get_installed_packages=lambda: []),
    )
    engine = engines._ArgosEngine(EngineSettings(), argos)  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="zhiyi engine install argos en de"):
        await engine.translate(["Hello."], "en", "de")


def test_the_engine_list_says_how_to_get_argos() -> None:
    status = {s.name: s for s in engines.engine_statuses(EngineSettings())}["argos"]
    if engines._argos() is None:
        assert not status.available and "pip install 'zhiyi[argos]'" in (status.reason or "")
    else:  # pragma: no cover - with the library, the pairs it has
        assert status.available == bool(status.pairs)
