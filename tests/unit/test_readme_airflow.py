"""The README's Airflow setup is copied into real deployments: its snippets must parse and name real things."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SECTION = README[README.index("### Airflow") : README.index("\n## API")]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", SECTION, flags=re.S)


def bundle_kwargs() -> set[str]:
    """DagcastDagBundle.__init__'s keyword arguments, read from the source: importing Airflow here would
    configure its logging inside the test process."""
    module = ast.parse((ROOT / "dagcast" / "airflow.py").read_text())
    (cls,) = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "DagcastDagBundle"]
    (init,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
    return {a.arg for a in init.args.kwonlyargs}


def test_the_bundle_config_names_the_class_and_only_kwargs_it_takes() -> None:
    (ini,) = blocks("ini")
    value = re.search(r"dag_bundle_config_list = (\[.*?\])\n#", ini, flags=re.S)
    assert value, ini
    (bundle,) = json.loads(value.group(1))
    assert bundle["classpath"] == "dagcast.airflow.DagcastDagBundle"
    accepted = bundle_kwargs() | {"refresh_interval", "view_url_template"}  # BaseDagBundle's
    assert {"root", "link", "api_url", "deployment", "token", "console_url"} <= accepted
    assert set(bundle["kwargs"]) <= accepted
    table = re.findall(r"^\| `(\w+)`", SECTION, flags=re.M)
    assert {"root", "link", "console_url"} <= set(table) <= accepted


def test_the_helm_values_are_yaml_for_the_official_chart_with_a_sidecar_and_an_init_container_per_component() -> None:
    (values,) = blocks("yaml")
    doc = yaml.safe_load(values)
    for component in ("scheduler", "dagProcessor", "workers", "triggerer"):
        (sidecar,) = doc[component]["extraContainers"]
        (init,) = doc[component]["extraInitContainers"]
        assert sidecar["command"][:2] == ["dagcast", "sidecar"] and "--once" not in sidecar["command"]
        assert init["command"][:3] == ["dagcast", "sidecar", "--once"]
        for container in (sidecar, init):
            assert {e["name"] for e in container["env"]} >= {"DAGCAST_API_URL", "DAGCAST_DEPLOYMENT", "DAGCAST_SIDECAR_NAME"}
            assert container["volumeMounts"] == doc["volumeMounts"]
    bundles = json.loads(doc["config"]["dag_processor"]["dag_bundle_config_list"])
    assert bundles[0]["kwargs"]["root"] == doc["volumeMounts"][0]["mountPath"]
    assert doc["config"]["core"]["dags_folder"] == bundles[0]["kwargs"]["root"] + "/current"
