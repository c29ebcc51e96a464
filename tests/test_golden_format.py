"""Golden bytes: the artifact format, frozen.

A small fixed model (int6 symbols of two layers sharing a role group, wide ECSQ-like int16
symbols with escapes, float16 scales, a float32 passthrough) is packed with each codec, and what
comes out is pinned here: each group's payload (sha256), the manifest (sha256 of its canonical
JSON, with library version strings blanked so a library upgrade alone does not fail it), the
whole artifact for the version-free ``raw`` codec (hex), and the entropy coder's payload (hex),
which is decoded from the pinned bytes rather than from a fresh encode.

These values were produced by running the code once and pasting the result. CHANGING ANY OF
THEM CHANGES THE FORMAT: bump ``pgolf_pack.pack.container.FORMAT_VERSION`` (and
``entropy_decode.VERSION`` for the entropy buffer) in the same change, and keep a reader for the
old version or say why not. Payload hashes of brotli / zstd / lzma also pin those libraries'
encoders at the versions the project installs; if an upgrade of one of them changes its
payload (decoding old payloads still works), re-pin that codec's entry and say so.

Run: python -m pytest -q tests/test_golden_format.py
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from pgolf_pack.coding import entropy_decode
from pgolf_pack.pack import codecs, container
from pgolf_pack.pack.container import canonical_json, read_container
from pgolf_pack.pack.packer import pack_model, unpack_model
from pgolf_pack.quant.base import QuantizedModel, QuantizedTensor, Stream

# The golden values below belong to these versions.
assert container.FORMAT_VERSION == 1 and entropy_decode.VERSION == 1


def _lcg(n: int, seed: int) -> np.ndarray:
    """Plain integer pseudo-random numbers in [0, 2**31): no numpy generator whose algorithm
    could change between numpy versions."""
    out, x = [], seed
    for _ in range(n):
        x = (1103515245 * x + 12345) % (1 << 31)
        out.append(x)
    return np.array(out, dtype=np.int64)


def _int6(rows: int, cols: int, seed: int) -> np.ndarray:
    # A sum of three uniforms: a bell-shaped code histogram, as quantized weights have.
    u = _lcg(3 * rows * cols, seed).reshape(3, rows, cols) >> 16
    return np.clip((u % 23).sum(axis=0) - 33, -31, 31).astype(np.int8)


def _wide(rows: int, cols: int, seed: int) -> np.ndarray:
    u = _lcg(rows * cols, seed).reshape(rows, cols) >> 8
    v = (u % 41) - 20
    v[(u % 97) == 0] = ((u[(u % 97) == 0] >> 7) % 6001) - 3000  # rare outliers: escape symbols
    return v.astype(np.int16)


def _scales(n: int, seed: int) -> np.ndarray:
    return ((_lcg(n, seed) % 1000 + 500) / 1.0e5).astype(np.float16)


def golden_model() -> QuantizedModel:
    tensors = []
    for layer in range(2):
        name = f"blocks.{layer}.mlp.fc.weight"
        tensors.append(QuantizedTensor(name, (6, 16), "float32", "intk", {"bits": 6, "clip": "sdclip"}, {
            "q": Stream(_int6(6, 16, 11 + layer), "symbols", -31, 31),
            "scale": Stream(_scales(6, 21 + layer), "side"),
        }))
    tensors.append(QuantizedTensor("tok_emb.weight", (8, 12), "float32", "ecsq", {"delta": 0.01}, {
        "q": Stream(_wide(8, 12, 5), "symbols", -3000, 3000),
        "scale": Stream(_scales(8, 7), "side"),
    }))
    gain = np.array([1.5, -0.25, 3.0, 0.125], np.float32)
    tensors.append(QuantizedTensor("blocks.0.attn.q_gain", (4,), "float32", "float", {"stored": "float32"},
                                   {"data": Stream(gain, "side")}))
    return QuantizedModel(tensors, {"golden": True})


_VERSION_KEYS = ("version", "constriction")


def _blank_versions(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    for g in m["groups"]:
        for k in _VERSION_KEYS:
            if k in g["codec_params"]:
                g["codec_params"][k] = "<version>"
    return m


def _digest(blob: bytes) -> dict:
    manifest, area = read_container(blob)
    payloads = [bytes(area[g["offset"]:g["offset"] + g["length"]]) for g in manifest["groups"]]
    return {
        "manifest": hashlib.sha256(canonical_json(_blank_versions(manifest))).hexdigest(),
        "groups": [(g["name"], g["codec"], g["length"], hashlib.sha256(p).hexdigest()[:32])
                   for g, p in zip(manifest["groups"], payloads)],
    }


GOLDEN: dict[str, dict] = {
    "entropy": {
        "manifest": "47e2a91a6e9aea5bc49bbe6d53f13f3907807a4f7be1028f23fad541e9081942",
        "groups": [
            ("mlp.fc.weight:q:|i1", "entropy", 166, "cb97c34c3e0015df6ab3b7e886a34520"),
            ("tok_emb.weight:q:<i2", "entropy", 99, "542109da334a6243a3947314881f590e"),
            ("side:2", "brotli", 44, "75bf1ea71917f88de8baa417b3b57fda"),
            ("side:4", "brotli", 20, "c47ad55435c7e5e7f647c94242d40b0d"),
        ],
    },
    "brotli": {
        "manifest": "99384390be5d9a507a91345b64b1c1830e1d586956984be9d4cc06347601f13e",
        "groups": [
            ("mlp.fc.weight:q:|i1", "brotli", 148, "19320c509a566eca7bc1e983db25a61e"),
            ("tok_emb.weight:q:<i2", "brotli", 115, "3904f323bb61742708df26b2f5e7f5ca"),
            ("side:2", "brotli", 44, "75bf1ea71917f88de8baa417b3b57fda"),
            ("side:4", "brotli", 20, "c47ad55435c7e5e7f647c94242d40b0d"),
        ],
    },
    "zstd": {
        "manifest": "76f3cf169eee1928eff7fdaa5b3170dbf0bc9c5f410f429a5cd840d64949a880",
        "groups": [
            ("mlp.fc.weight:q:|i1", "zstd", 153, "0f24d1baa5fd264aae004afea2d1c2e0"),
            ("tok_emb.weight:q:<i2", "zstd", 143, "0949eef193f524078b7482008804aa83"),
            ("side:2", "zstd", 49, "6ad78f30077c63aa875199e4b7b1a28f"),
            ("side:4", "zstd", 25, "017113ff56d1f85cc494285daa7fd074"),
        ],
    },
    "lzma": {
        "manifest": "f87e49fe00a23502a8388585f557548de9fc791bc71d2bd99ef15a0b300615b0",
        "groups": [
            ("mlp.fc.weight:q:|i1", "lzma", 177, "46f76a1bd874a0d6be31fd1dc5be50c8"),
            ("tok_emb.weight:q:<i2", "lzma", 146, "a4aba2caf034413d616c9712d29f2e5b"),
            ("side:2", "lzma", 64, "f6875c005e2b379f7d726c9b91f6e4ea"),
            ("side:4", "lzma", 34, "46e63b58966305c09736eff9bfd3ad80"),
        ],
    },
    "raw": {
        "manifest": "1f83a80c16715277e5bfdf0436cbc50a43f424db7c9d10f8023eebee487bdbd0",
        "groups": [
            ("mlp.fc.weight:q:|i1", "raw", 144, "e147eab7bb1feb3dd89910586f5065e7"),
            ("tok_emb.weight:q:<i2", "raw", 192, "23408501ced51bf2b5fe7978a51c2525"),
            ("side:2", "raw", 40, "85ba9c914ee7b56d1000caf34322b20e"),
            ("side:4", "raw", 16, "23e4da7ccfa34658b44c8781dd200338"),
        ],
    },
}

RAW_ARTIFACT_HEX = (
    "5047504b01190200001eb8068b1b4208001c077673ce8b24789735766266cda5fc8e2fb1f247cd7d53c03c50ebb0"
    "74f5557522e2c6f964db69da223c1da1ebffff7eeeaf795c5ea82b55c44a5edab9777f620adede21e1ef23e60d2a"
    "192f9118a899c8c1c69aed8980e77c55f10bc393a00219c1eb0d60cb149e1217bc5f9889bbb743e6899eb089e121"
    "40f1d5c3c01015a06f019cb789a02098aa5b167c27610a8a3124dc362338d8f0760a7cd31c5cc3ddfb999e35ffc1"
    "8a4c4ddd437f838f3c0083377599f7c0bb009dd9cdd1fc384600edbbc0c26edef3667ae54e971ada678559eab281"
    "9cb26fa1aba9eb9a25fdd1b57acdbd9cfc03e41648f618b222a3dbe7f604e7a61ae935c88cac63b24d8af645b3ac"
    "e304a1e45e5f3e546b7cd4bcfda5b3b773bb5e3cdce39e609562b389d8028936347a3b4f26d83d2713c533169b15"
    "3725a7effa451631ad51c8249bf692018c578be6ba29694aee925c58488cca105f5568f5297c695edb19a2e37d94"
    "c70bfd9aa5931a8a623cf2f00aa2272c9d434002e2650cba902e4e02aefea6f910514f03f02a13f6b89134e72d4a"
    "f30d1930e6d10f072802c1948d6f608ac42018db1d09812712f26931a8c605339300bbce27626fc9a6c53d0debd9"
    "05871bfe61f65fc4c55f55a14345e2a325b1c20faa3ec127123efee4ae835fa96bbb8e13896e48d24721252d6ab5"
    "31d2c41a559130481a913538547685ee22ff8a596c3c8257f8f9e279936c80849f2ef57cb6ab091fc22cbf03d9cb"
    "7dddf4616407ef559b6e56ca7dc9373162f23d0fb6466348ad52274997697f29c69ad5f9459c553ed44846eb053a"
    "d6044999dcbd14076e1db59945e86ce54932dc65364b86860e474d11aca2d9c6b8a949bd59d54d1f468226593824"
    "b9798596865da59127bc699f547b9bf8b48fa95999fc55da83af9cdaa95e995ed9069628a7699e5ac31c07401ac6"
    "cd15aa5a00f90103f00f07fffe0812fbf1f60d06ec0ef3ec13000cf50c0ff013470c09ec0407f9f1f412ee11fbf5"
    "04f5f304f21010fef605f708110bfd110d0bfa03f9f2fc00fef6f8fbefef0dfeedf612030a01f50c0c0007fe00f2"
    "fb09fb04030d0c0000ff0000ff0000ffff0000ffffff0000ff00ffff000000ff0000ff00070000ff0000ffffff00"
    "ff00ffff00ffff00ff0000ffff00ff000000ff000000ff00ffffff00ffffffffffff00ffffff00000000ff000000"
    "00ff00ffff00ff0000000000391dca20d31ffd220221f022ab21a1207e2142224d226a1f4f1e44205d237c21d621"
    "3a21ce1f031e0000c03f000080be000040400000003e"
)

# Every entropy model's buffer for the two symbol groups: (int6 group, wide int16 group).
ENTROPY_PAYLOADS_HEX: dict[str, tuple[str, str]] = {
    "hist": (
        (
            "5047450100a701f194f87825603060f018bcfbfffffffdd12a7ffffdfefde7c4c3c4e377fffffd513ffe"
            "a7fe9dffbf79730019a7af48f03d3c31e0b4c1f9d09bc197d384b94a6268ebf8e5c84b9707e983a00567"
            "8adb97d8527b5b711b60e9b2a6316154704a6d3069c27a6fc7205dd4e2e36d56d0b4e71bc4c94cd178d9"
            "04d554eec5596ae28a093a3671768ecfca1f969392e208341687b79f650992abcbd46058f69f2e577115"
            "d0fef8766216f7ba3300"
        ),
        (
            "504745010059c3bfceda11406100176a261f4d3be71d0e8c5717830016db2df93e2b63cca3c0738636a5"
            "4969569f80440006863868df0d599756fa03c45f63035b71f6eacb30730d186abf94da3d233b777cdeec"
            "a5bcc11ca7a5c185af2614db34e340"
        ),
    ),
    "col": (
        (
            "5047450101a101c871c2080f603060f020005410880ffa226410c000abd7a3e905b8ca9d2d1b3c1dfdeb"
            "21071a587417d51725f92ea0ad8e79d992804942f6dab6e079f9b35b5e03da7d13c8ab407e4e19578335"
            "a3a8735be69f4eb90be713718a3dbe16d4161acac4b52b8f073329319faa6f2bca9724ed578a40ac0715"
            "372fcb48b467c33b293dd7a110f02c086052da795b9b22a0f04b8f22049ca38069ea63061f08111c4458"
            "b2e38f92"
        ),
        (
            "504745010163990250de13406100176a2720005c6943ff91b87462b8bc1816f58cf8e75e9ee59506bc18"
            "5cb766071542a9080006862be201083e94ee1b51024a7cd7cb3a54536fbbfefef16cb15deb87602b588d"
            "b23ceba33efcd30b710916fb53de8e12ea7bb3dc4101000000"
        ),
    ),
    "row": (
        (
            "50474501029b01d4aeae7a0d603060f020005c6880f7f9646c00f45832ae96ff80992a88f68708e91b73"
            "ede75109a297ad5c20a927806c4161e3933be48e6e25d4ea86df30754aa9436fca840b8ee98b452d5cdc"
            "2ff0042a31f39b3796753417410f49e96d08d11f8b0109e11d7c3b4161a37964dab32ba59ccc5d8e5f2f"
            "a2699be4af21c165e7ad6899c9e9325d7b696f38381e36fcd718ecd8a753740064d1849b44000000"
        ),
        (
            "504745010260a819209d14406100176a2720005c4943f742270e8c57178300167b8193ebb7d5b1e444b4"
            "9f80651e039c31b52a00068685ac89cc8c01d99677927273e9c620492d394df004caa7be01486c1164e1"
            "eacca9be1f309f43ad470a44a67d692a534bc8e00f00"
        ),
    ),
    "rc": (
        (
            "5047450103ad0167ee371d13603060f0200186983ffe054108a0ffa7fe410c0054b425f13943838da6f3"
            "690d4b628c6646b7831d9c22c60fe4b61e21add85a8880ac3219094380a58f6451c5df3a1b6c5a72c77a"
            "a89c84aefa222116bc78fa7e0ed62e51cd9612ce39c15b04db20dc8d8e1d178b441b2cc4017b1618e7ae"
            "be494adb8e9db23717d3a48e800b6c4e73fa5ab05ad68b6642631253970165cd5fc56c7e5b4ae1959fdb"
            "58f1aa3b8007bf753d11980302000000"
        ),
        (
            "50474501036a4e0550411a406100176a272001049c3fcd00a8d141fbde5e46e1d18ae2f06016f9e06bfb"
            "9c7ba5e1ccc63d3204222d5581c5508006869fba9ddcc520735a832c84bfc55037295821b8e25d4e01e2"
            "0e447b55dc18c9f526df3d08de6b79352e839158208cfe28f75f050f18000000"
        ),
    ),
    "ref": (
        (
            "5047450104b1015e452e2b17603041f83c08011b39c30d307ffc0a821141ff4ffc82180054b425f13943"
            "838da6f3690d4b628c6646b7831d9c22c60fe4b61e21add85a8880ac3219094380a58f6451c5df3a1b6c"
            "5a72c77aa89c84aefa222116bc78fa7e0ed62e51cd9612ce39c15b04db20dc8d8e1d178b441b2cc4017b"
            "1618e7aebe494adb8e9db23717d3a48e800b6c4e73fa5ab05ad68b6642631253970165cd5fc56c7e5b4a"
            "e1959fdb58f1aa3b8007bf753d11980302000000"
        ),
        (
            "50474501046d2b6201e31d4061000464a2720044ce70824e1fe6805468a0fdef2f2370e8c571783016f9"
            "e06bfb9c7ba5e1ccc63d3204222d5581c5508006869fba9ddcc520735a832c84bfc55037295821b8e25d"
            "4e01e20e447b55dc18c9f526df3d08de6b79352e839158208cfe28f75f050f18000000"
        ),
    ),
}


def _check_decoded(blob: bytes) -> dict:
    back, manifest = unpack_model(blob)
    want = golden_model()
    assert back.names() == want.names() and back.meta == want.meta
    for a, b in zip(want.tensors, back.tensors):
        assert (a.shape, a.dtype, a.scheme, a.params) == (b.shape, b.dtype, b.scheme, b.params)
        assert set(a.streams) == set(b.streams)
        for name, s in a.streams.items():
            t = b.streams[name]
            assert (t.kind, t.lo, t.hi, t.data.dtype, t.data.shape) == (s.kind, s.lo, s.hi, s.data.dtype, s.data.shape)
            np.testing.assert_array_equal(t.data, s.data)
    return manifest


@pytest.mark.parametrize("codec", ["entropy", "brotli", "zstd", "lzma", "raw"])
def test_golden_artifact(codec):
    blob = pack_model(golden_model(), codec=codec).blob
    assert _digest(blob) == GOLDEN[codec]
    assert pack_model(golden_model(), codec=codec, workers=1).blob == blob
    manifest = _check_decoded(blob)
    assert manifest["format"] == container.FORMAT_VERSION and blob[4] == container.FORMAT_VERSION
    # The version strings that were blanked are the installed libraries' own.
    for g in manifest["groups"]:
        assert g["codec_params"] == codecs.codec_params(g["codec"])


def test_golden_raw_artifact_bytes():
    blob = pack_model(golden_model(), codec="raw").blob
    assert blob.hex() == RAW_ARTIFACT_HEX
    _check_decoded(bytes.fromhex(RAW_ARTIFACT_HEX))


@pytest.mark.parametrize("model", sorted(ENTROPY_PAYLOADS_HEX))
def test_golden_entropy_payloads(model):
    from pgolf_pack.coding.entropy import entropy_encode

    want = golden_model()
    int6 = [want["blocks.0.mlp.fc.weight"].streams["q"].data, want["blocks.1.mlp.fc.weight"].streams["q"].data]
    wide = [want["tok_emb.weight"].streams["q"].data]
    for hexed, arrays, lo, hi in zip(ENTROPY_PAYLOADS_HEX[model], (int6, wide), (-31, -3000), (31, 3000)):
        # Decoded from the pinned bytes: the decoder reads format 1 whatever the encoder does now.
        out = entropy_decode.entropy_decode(bytes.fromhex(hexed), [a.shape for a in arrays],
                                            [a.dtype.str for a in arrays], lo, hi)
        for a, b in zip(arrays, out):
            assert b.dtype == a.dtype
            np.testing.assert_array_equal(a, b)
        assert entropy_encode(arrays, lo, hi, model).hex() == hexed


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip binary not installed")
@pytest.mark.parametrize("codec", ["lrzip", "lrzip-lzma"])
def test_lrzip_format_fields_and_roundtrip(codec):
    # lrzip's bytes depend on its version, so it is pinned by what the manifest records.
    blob = pack_model(golden_model(), codec=codec).blob
    manifest = _check_decoded(blob)
    _, area = read_container(blob)
    for g in manifest["groups"]:
        assert g["codec"] == codec
        p = g["codec_params"]
        assert (p["binary"], p["env"]) == ("lrzip", {"LRZIP": "NOCONFIG"})
        assert p["args"] == ["-q", "-z", "-L", "9", "-T"] if codec == "lrzip" else ["-q", "-L", "9", "-T"]
        assert bytes(area[g["offset"]:g["offset"] + 4]) == b"LRZI"
