"""export-decoder: the standalone decoder that goes inside a submission."""

from __future__ import annotations

from pathlib import Path

import typer

from ..ship.exporter import export_decoder_file
from .app import JsonOpt, app, console, fmt_int, handle_errors, print_json


@app.command("export-decoder")
@handle_errors
def export_decoder_cmd(
    artifact: Path = typer.Argument(..., help="the .pgp artifact the decoder is for"),
    output: Path = typer.Option(..., "-o", "--output", help="Python file to write (e.g. pgp_decode.py)"),
    minify: bool = typer.Option(True, "--minify/--no-minify",
                                help="write the minified, compressed self-extracting file (what counts in the submission) "
                                     "instead of the readable source"),
    json_out: bool = JsonOpt,
) -> None:
    """Write one self-contained Python file with load(path_or_bytes) -> state dict, holding only the
    decode paths this artifact uses (imports: stdlib, numpy, torch and the codec libraries it names)."""
    dec = export_decoder_file(artifact, output, minify)
    written = len(dec.code(minify))
    if json_out:
        print_json({"output": str(output), "bytes": written, "form": "wrapped" if minify else "raw", **dec.to_dict()})
        return
    s = dec.sizes()
    console.print(f"wrote {output}: {fmt_int(written)} bytes ({'minified, ' + s['compressor'] + '-wrapped' if minify else 'readable source'})")
    console.print(f"decoder bytes: raw {fmt_int(s['raw'])}, minified {fmt_int(s['minified'])}, wrapped {fmt_int(s['wrapped'])}")
    console.print(f"codecs: {', '.join(dec.codecs)}; schemes: {', '.join(dec.schemes)}")
