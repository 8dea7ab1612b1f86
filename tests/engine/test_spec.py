"""Spec validation: every mistake is reported by its field path with what is allowed."""

from __future__ import annotations

import pathlib

import pytest
import yaml

import ebbtide_engine as ebbtide

GOOD = {"vms": [{"name": "web", "disks": [{"name": "root", "size": "64Mi"}]}]}


def test_defaults_and_units() -> None:
    spec = ebbtide.VpgSpec.parse(
        "demo", {**GOOD, "checkpointInterval": "10s", "journalHistory": "7d"}
    )
    assert spec.checkpoint_interval == 10
    assert spec.journal_history == 7 * 86400
    assert spec.target_rpo == 300
    assert spec.vms[0].disks[0].size == 64 << 20
    assert spec.journal.segment_max_bytes == 16 << 20
    assert spec.disk_sizes() == {"web": {"root": 64 << 20}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vms": []}, "spec.vms: List should have at least 1 item"),
        ({"checkpointInterval": "5x"}, "spec.checkpointInterval: '5x' is not a duration"),
        (
            {"checkpointInterval": "2h"},
            "spec.checkpointInterval: Input should be less than or equal to 3600",
        ),
        (
            {"journalHistory": "10m"},
            "spec.journalHistory: Input should be greater than or equal to 3600",
        ),
        (
            {"vms": [{"name": "Web", "disks": [{"name": "a", "size": 512}]}]},
            "spec.vms[0].name: VM name 'Web'",
        ),
        (
            {"vms": [{"name": "w", "disks": [{"name": "a", "size": "1Q"}]}]},
            "spec.vms[0].disks[0].size: '1Q'",
        ),
        ({"vms": [{"name": "w", "disks": [{"name": "a", "size": 1000}]}]}, "not a multiple of 512"),
        (
            {
                "vms": [
                    {"name": "w", "disks": [{"name": "a", "size": 512}, {"name": "a", "size": 512}]}
                ]
            },
            "disk names must be unique; repeated: a",
        ),
        (
            {"vms": [{"name": "w", "disks": [{"name": "a", "size": 512, "mode": "Proxy"}]}]},
            "a Proxy disk needs source.path",
        ),
        ({"journal": {"maxUnshippedBytes": "16Mi"}}, "must be at least twice segmentMaxBytes"),
        ({"colour": "blue"}, "spec.colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_name_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(ebbtide.SpecError) as caught:
        ebbtide.VpgSpec.parse("demo", {**GOOD, **change})
    assert message in str(caught.value)
    assert str(caught.value).startswith("VPG 'demo' has an invalid spec:")


def test_a_whole_resource_and_the_examples_parse() -> None:
    examples = pathlib.Path(__file__).resolve().parents[2] / "examples"
    found = 0
    for path in sorted(examples.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "VirtualProtectionGroup":
                spec = ebbtide.VpgSpec.from_resource(document)
                assert spec.vms
                found += 1
    assert found >= 1
    with pytest.raises(ebbtide.SpecError, match="expected kind VirtualProtectionGroup"):
        ebbtide.VpgSpec.from_resource({"kind": "Pod"})
    with pytest.raises(ebbtide.SpecError, match=r"no metadata\.name"):
        ebbtide.VpgSpec.from_resource({"kind": "VirtualProtectionGroup", "spec": GOOD})
