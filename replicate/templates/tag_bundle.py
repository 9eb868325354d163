"""Tag photos with this bundle: ONNX Runtime, numpy and Pillow alone, no replicate installed.

    python tag.py PHOTOS_OR_FOLDERS... [--model bundle.onnx] [--out tags.csv]

`replicate bundle` wrote this script beside bundle.onnx and photos.py (replicate's own decoding,
copied: EXIF orientation, the draft-mode rule and the validation crop, so the model sees the
pixels its validation saw). One CSV row per photo: path, error, and per attribute
<name>_predicted (its one answer: the class, or for a yes/no search filter the filter's answer at
its threshold), <name>_p_<class> and, for a filter, <name>_has_<...> (the same answer as a flag):
the columns and the numbers `replicate predict` writes. A photo that cannot be read has no answer
(empty). A listing has what any of its photos answers (bundle.json records each filter's listing
rule).

Everything the model needs is in its metadata (key "replicate", JSON): the input size, crop,
resampling and normalisation, and per attribute its output name, classes and filter.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import photos  # noqa: E402  (the copy beside this script)


def image_files(paths):
    """The files named, and the image files under the folders named, in the order `replicate
    predict` takes them (photos.image_files: each folder's files sorted, then its sub-folders)."""
    found = []
    for p in map(Path, paths):
        found += photos.image_files(p) if p.is_dir() else [p]
    return list(dict.fromkeys(found))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", nargs="+", help="photos, or folders searched recursively")
    parser.add_argument("--model", default=str(HERE / "bundle.onnx"), help="the bundle's .onnx")
    parser.add_argument("--out", default="-", help="CSV to write (default: standard output)")
    parser.add_argument("--bs", type=int, default=32, help="photos per batch")
    args = parser.parse_args()

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["replicate"])
    prep = photos.Preprocess.from_meta(meta)
    attributes = meta["attributes"]
    mean = np.array(prep.mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255
    scale = 1 / (np.array(prep.std, dtype=np.float32).reshape(1, 3, 1, 1) * 255)
    input_name = session.get_inputs()[0].name

    columns, flags = ["path", "error"], []
    for a in attributes:
        columns += [f"{a['name']}_predicted"] + [f"{a['name']}_p_{c}" for c in a["classes"]]
        if a.get("filter") and a["filter"].get("threshold") is not None:
            flags.append(f"{a['name']}_{a['filter']['column']}")
    columns += flags  # after every attribute's probabilities, as predict writes them
    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="")
    writer = csv.DictWriter(out, columns, restval="")
    writer.writeheader()

    def flush(batch):
        """Write the batch's rows in order: (path, decoded arrays, error) each."""
        ok = [arrays[prep.geometry] for _, arrays, error in batch if not error]
        outputs = []
        if ok:
            pixels = np.stack(ok).transpose(0, 3, 1, 2).astype(np.float32)
            x = np.ascontiguousarray((pixels - mean) * scale)
            outputs = session.run([a["output"] for a in attributes], {input_name: x})
        row = 0
        for path, _, error in batch:
            if error:  # a photo that does not decode has no answer: empty, not False
                writer.writerow({"path": str(path), "error": error})
                continue
            record = {"path": str(path), "error": ""}
            for a, probs in zip(attributes, outputs):
                p = probs[row]
                answer = a["classes"][int(p.argmax())]
                record.update(
                    {f"{a['name']}_p_{c}": repr(float(v)) for c, v in zip(a["classes"], p)}
                )
                found = a.get("filter") or {}
                if found.get("threshold") is not None:  # the filter's answer is the answer
                    flag = bool(p[a["classes"].index(found["positive"])] >= found["threshold"])
                    others = [c for c in a["classes"] if c != found["positive"]]
                    answer = found["positive"] if flag else others[0]
                    record[f"{a['name']}_{found['column']}"] = flag
                record[f"{a['name']}_predicted"] = answer
            writer.writerow(record)
            row += 1
        batch.clear()

    batch = []
    for path in image_files(args.photos):
        batch.append((path, *photos.decode(path, [prep.geometry])))
        if len(batch) == args.bs:
            flush(batch)
    if batch:
        flush(batch)
    if out is not sys.stdout:
        out.close()


if __name__ == "__main__":
    main()
