"""Write a copy of a GGUF file that keeps only its first N transformer blocks.

    .venv/bin/python bench/gguf_trim.py IN.gguf OUT.gguf --layers 10

Why: the GPU machine is reached through a 64 MiB transfer and cannot download anything, and the bundled
SmolLM2 file is 94 MiB. Its first 10 of 30 blocks, with the real embeddings, tokenizer and chat template,
make a 52 MiB model of the same architecture and quantization: real weights for GPU-vs-CPU checks and
GPU timings (bench/gpu_check.sh). Tensors are copied byte for byte; only `<arch>.block_count` changes.
"""

from __future__ import annotations

import argparse
import re
import sys

import gguf


def trim(src: str, dst: str, layers: int) -> int:
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    count_key = f"{arch}.block_count"
    total = int(reader.fields[count_key].contents())
    if not 1 <= layers <= total:
        raise SystemExit(f"gguf_trim: --layers must be in 1..{total}, got {layers}")
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # general.architecture and GGUF.* are written by GGUFWriter itself.
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == count_key else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    block = re.compile(r"blk\.(\d+)\.")
    kept = [t for t in reader.tensors if not (m := block.match(t.name)) or int(m.group(1)) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, required=True)
    args = ap.parse_args(argv)
    total = trim(args.src, args.dst, args.layers)
    print(f"{args.dst}: first {args.layers} of {total} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
