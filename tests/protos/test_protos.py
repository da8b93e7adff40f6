"""The committed generated code matches protos/; every field is documented."""

from __future__ import annotations

import re

from protos import codegen


def test_generated_code_is_fresh(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in codegen.generate(tmp_path)}
    committed = {p: (codegen.OUT / p).read_bytes() for p in fresh if (codegen.OUT / p).exists()}
    stale = sorted(str(p) for p in fresh if committed.get(p) != fresh[p])
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_every_field_has_a_comment():
    for proto in codegen.proto_files():
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if re.match(r"^(optional |repeated )?[\w.<>, ]+ \w+ = \d+;", stripped) and not stripped.startswith(
                    ("option", "reserved")):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1}: {stripped} has no comment"


def test_enums_start_unspecified():
    for proto in codegen.proto_files():
        for name, body in re.findall(r"enum (\w+) \{(.*?)\}", proto.read_text(), flags=re.S):
            first = re.search(r"(\w+) = 0;", body)
            assert first and first.group(1).endswith("_UNSPECIFIED"), f"{proto.name}: enum {name}"
