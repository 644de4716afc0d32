"""Run llama.cpp's convert_hf_to_gguf.py with extra string keys written in the converter's own pass.

    python converter_child.py CONVERTER KEYS_JSON [converter arguments...]

The converter runs unchanged, as from a shell; its GGUFWriter gets the keys just before it writes the header, so no
second copy of a 5 GB file is needed to add them. Run by file path: it imports nothing of ours.
"""

import json
import runpy
import sys
from pathlib import Path


def main() -> None:
    converter, keys_json, *args = sys.argv[1:]
    # As `python convert_hf_to_gguf.py` would have it: the script's folder first on the path (not this file's).
    sys.path[0] = str(Path(converter).parent)
    # What convert_hf_to_gguf.py does at import unless NO_LOCAL_GGUF is set: prefer the gguf-py beside it.
    # Importing it first makes the converter's `import gguf` this same module, the one patched below.
    sys.path.insert(1, str(Path(converter).parent / "gguf-py"))
    import gguf  # noqa: PLC0415 (from the path set just above, not the installed one)

    extra: dict[str, str] = json.loads(keys_json)
    write_header = gguf.GGUFWriter.write_header_to_file

    def write_header_with_keys(self, *a, **kw):
        for key, value in extra.items():  # add_key_value: add_string would skip an empty value
            self.add_key_value(key, value, gguf.GGUFValueType.STRING)
        return write_header(self, *a, **kw)

    gguf.GGUFWriter.write_header_to_file = write_header_with_keys  # type: ignore[method-assign]
    sys.argv = [converter, *args]
    runpy.run_path(converter, run_name="__main__")


if __name__ == "__main__":
    main()
