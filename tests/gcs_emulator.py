"""A Google Cloud Storage emulator on 127.0.0.1, in memory (the `gcp-storage-emulator`
package), for the tests of gs:// workdirs: `python tests/gcs_emulator.py PORT BUCKET`.

Its downloads lack GCS's `x-goog-generation` header, which tensorstore (orbax's array
writer) reads to make conditional writes; the real service always sends it, so it is added
here to each object read.
"""

from __future__ import annotations

import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


def _with_generation(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - no such object: the handler answered already
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    return wrapped


def _patch_handlers() -> None:
    reads = {objects.download: _with_generation(objects.download)}
    reads[objects.get] = _with_generation(objects.get)
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler in reads:
                methods[method] = reads[handler]


def main(port: int, bucket: str) -> None:
    _patch_handlers()
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
