"""The security review's points (docs/security.md) that one process can check: crafted pickles in a checkpoint are
refused without running, YAML is only read with safe_load, subprocesses never go through a shell."""

from __future__ import annotations

import ast
import dataclasses
import datetime
import io
import ipaddress
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from dtrain.checkpoint import META_FILE, list_checkpoints, verify
from dtrain.cli import main
from dtrain.distributed import init_distributed, shutdown
from dtrain.manifest import manifest
from tests.helpers.launch import ROOT, TINY
from tests.helpers.ranks import free_port


class _Payload:
    """Unpickling this creates `marker` (as any function a pickle names would be run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def _craft_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / ".metadata").write_bytes(_crafted(marker))


def _craft_local_state(ckpt: Path, marker: Path) -> None:
    torch.save({"strategy": _Payload(marker)}, ckpt / "rank0.pt")


def _craft_dcp_value(ckpt: Path, marker: Path) -> None:
    """Swap one non-tensor value (an optimizer hyper-parameter) inside the .distcp file for the payload, and
    point DCP's metadata at it: a well-formed DCP checkpoint that carries a crafted pickle."""
    md = pickle.loads((ckpt / ".metadata").read_bytes())  # the test's own file: plain pickle is fine here
    index = next(i for i in md.storage_data if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info = md.storage_data[index]
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    payload = buf.getvalue()
    shard = ckpt / info.relative_path
    data = shard.read_bytes()
    shard.write_bytes(data[: info.offset] + payload + data[info.offset + info.length :])
    shift = len(payload) - info.length
    for key, other in md.storage_data.items():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            md.storage_data[key] = dataclasses.replace(other, offset=other.offset + shift)
    md.storage_data[index] = dataclasses.replace(info, length=len(payload))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("security") / "run"
    assert main(["train", "--config", TINY, "--set", f"run.dir={run}"]) == 0
    return run


@pytest.mark.parametrize(
    "craft, refused",
    [(_craft_metadata, r"\.metadata"), (_craft_local_state, r"rank0\.pt"), (_craft_dcp_value, r"step_00000006")],
    ids=["dcp-metadata", "rank-local-state", "dcp-non-tensor-value"],
)
def test_a_crafted_pickle_with_a_matching_manifest_is_refused_without_running(
    trained, tmp_path, capsys, craft, refused
):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = list_checkpoints(run / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    craft(newest, marker)
    meta = json.loads((newest / META_FILE).read_text())
    meta["manifest"] = manifest(newest, exclude=META_FILE)  # whoever crafted it updated the checksums too
    (newest / META_FILE).write_text(json.dumps(meta))
    assert verify(newest) is None
    capsys.readouterr()
    code = main(["train", "--config", TINY, "--resume", "--set", f"run.dir={run}", "train.steps=8"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtrain: error")]
    assert not marker.exists()
    assert code == 2 and len(err) == 1, err
    assert "is refused: its pickle asks for" in err[0] and "open" in err[0], err[0]
    assert re.search(refused, err[0]), err[0]


# ---------------------------------------------------------------------------------------------- source scans

SOURCES = [p for folder in ("dtrain", "launch", "bench", "examples") for p in sorted((ROOT / folder).rglob("*.py"))]


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_yaml_is_only_read_with_safe_load():
    unsafe = [
        f"{p.relative_to(ROOT)}:{node.lineno}: {name}"
        for p in SOURCES
        for node, name in _calls(p)
        if name.startswith("yaml.")
        and name.split(".")[-1] in ("load", "load_all", "unsafe_load", "full_load")
        or "Loader" in ast.unparse(node)
        and "yaml" in ast.unparse(node)
        and "SafeLoader" not in ast.unparse(node)
    ]
    assert SOURCES and not unsafe, unsafe


#: the one plain unpickling of bytes: what the ranks of one job send each other (all_gather_objects,
#: broadcast_object); the job's ranks trust each other (docs/security.md), files are never read this way
PEER_PICKLES = {("dtrain/distributed.py", "pickle.loads")}


def _constant(node: ast.Call, keyword: str):
    return next((k.value.value for k in node.keywords if k.arg == keyword and isinstance(k.value, ast.Constant)), None)


def test_no_file_is_unpickled_by_anything_that_runs_code():
    found = [
        f"{p.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}"
        for p in SOURCES
        for node, name in _calls(p)
        if (name == "torch.load" and _constant(node, "weights_only") is not True)
        or (name in ("np.load", "numpy.load") and _constant(node, "allow_pickle") not in (None, False))
        or (name in ("pickle.load", "pickle.loads") and (p.relative_to(ROOT).as_posix(), name) not in PEER_PICKLES)
    ]
    assert not found, found


def test_subprocesses_take_argument_lists_and_never_a_shell():
    found = []
    for p in SOURCES:
        for node, name in _calls(p):
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}: {name}")
            if name.startswith("subprocess.") and name.split(".")[-1] in (
                "run",
                "Popen",
                "call",
                "check_call",
                "check_output",
            ):
                shell = any(k.arg == "shell" for k in node.keywords)
                first = node.args[0] if node.args else None
                if shell or isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, found


# ---------------------------------------------------------------------------------------------- the job's store


def _listening(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` ('127.0.0.1', '::' for every interface, ...)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints host order
                found.append(str(ipaddress.ip_address(words)) if width == 8 else str(ipaddress.IPv6Address(words)))
    return found


def test_the_store_dtrain_hosts_listens_on_the_address_it_was_given_only(monkeypatch):
    timeout = datetime.timedelta(seconds=10)
    torch_own = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timeout)
    assert _listening(torch_own.port) == ["::"]  # torch's server: every interface, whatever host it is given
    port = free_port()
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    init_distributed(timeout_s=10)
    try:
        assert _listening(port) == ["127.0.0.1"]
    finally:
        shutdown()


class _ByGetattr:
    """Pickles as getattr(owner, name), as Python 3.11.2 pickles an enum member."""

    def __init__(self, owner, name: str) -> None:
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_metadata_may_name_dcp_enum_members_by_getattr_and_nothing_else(tmp_path: Path):
    """Debian bookworm's Python 3.11.2 writes DCP's _MEM_FORMAT_ENCODING members as getattr(Enum, NAME): those
    load; a getattr of anything else (here PosixPath.write_text, which a REDUCE could then call) is refused."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from dtrain.safeload import UnsafeCheckpoint, read_dcp_metadata

    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    good = tmp_path / "good"
    good.write_bytes(pickle.dumps(_ByGetattr(_MEM_FORMAT_ENCODING, member.name)))
    with pytest.raises(UnsafeCheckpoint, match="instead of DCP's Metadata"):  # the member loaded; it is no Metadata
        read_dcp_metadata(good)
    bad = tmp_path / "bad"
    bad.write_bytes(pickle.dumps(_ByGetattr(type(Path()), "write_text")))  # PosixPath: an allowed class
    with pytest.raises(UnsafeCheckpoint, match=r"getattr\(PosixPath, .write_text.\)"):
        read_dcp_metadata(bad)
