"""Load any Hugging Face dataset split and decide which columns hold prompt and response."""

from __future__ import annotations

import glob
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from srdata.run.identity import dataset_identity, file_states, local_dataset_files

DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

# Common layouts, tried in order: (prompt, input/context, response).
KNOWN_LAYOUTS: list[tuple[str, Optional[str], str]] = [
    ("instruction", "input", "output"),  # Alpaca
    ("instruction", "context", "response"),  # Dolly
    ("prompt", None, "completion"),
    ("prompt", None, "response"),
    ("question", None, "answer"),
    ("instruction", None, "output"),
    ("instruction", None, "response"),
    ("input", None, "output"),
]
MESSAGE_COLUMNS = ("messages", "conversations")


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns feed the prompt, the optional input/context and the reference response.

    A chat layout has ``messages_column`` set instead: the last assistant turn is the
    reference, the turns before it are the prompt.
    """

    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    input_column: Optional[str] = None
    messages_column: Optional[str] = None
    detected: bool = False

    def describe(self) -> str:
        how = "auto-detected" if self.detected else "given"
        if self.messages_column:
            return f"chat messages from column '{self.messages_column}' ({how})"
        text = f"prompt='{self.prompt_column}', response='{self.response_column}'"
        if self.input_column:
            text += f", input='{self.input_column}'"
        return f"{text} ({how})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def column_mapping(config: Any) -> ColumnMapping:
    """The columns a resolved :class:`~srdata.config.ScoreConfig` names (``srdata.pipeline.score`` writes them
    into its ``data`` section once): what shards, engines and Ray replicas read the rows with.

    Example:
        >>> from srdata.config import build_config
        >>> config = build_config(dict(dataset="d.jsonl", model="m", output="o", prompt_column="q", response_column="a"))
        >>> column_mapping(config).describe()
        "prompt='q', response='a' (given)"
    """
    data = config.data
    return ColumnMapping(data.prompt_column, data.response_column, data.input_column, data.messages_column)


class DatasetLoadError(ValueError):
    """The dataset could not be found or read; the message says why and what to do."""


def load_split(dataset: str, split: str = "train", limit: int | None = None):
    """Load one split of ``dataset`` as a ``datasets.Dataset``.

    ``dataset`` may be a data file (.jsonl/.json/.parquet/.csv), a glob or comma-separated
    list of such files, a ``save_to_disk`` folder, a folder of data files, or a hub id.

    Example:
        >>> ds = load_split("data/train.jsonl")   # doctest: +SKIP
    """
    return load_split_with_identity(dataset, split, limit)[0]


def load_split_with_identity(dataset: str, split: str = "train", limit: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Load one split (as :func:`load_split`) and the fingerprint of what was read.

    Local data is identified by its content (:func:`srdata.run.identity.dataset_identity`),
    and read through a datasets cache keyed on that content: datasets' own cache is keyed
    on path and modification time, so a file edited with its mtime kept (``cp -p``,
    ``rsync -t``) would otherwise be read with its old content. A hub dataset is identified
    by its name and datasets' fingerprint (which includes the hub revision).

    Example:
        >>> ds, identity = load_split_with_identity("data/train.jsonl")   # doctest: +SKIP
        >>> identity["content"][:8]                                        # doctest: +SKIP
        '3f2a9c01'
    """
    ds, identity = _load(dataset, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds, identity


def _content_keyed(files: list[Path], root: Path | None, load: Callable[[str], Any]) -> tuple[Any, dict[str, Any]]:
    """``load(cache_dir)`` with a datasets cache folder named by the files' content digest.

    The files' size, mtime, ctime and inode are compared before hashing and after reading, so
    a file changed meanwhile is refused rather than recorded under the wrong fingerprint.
    """
    import datasets

    before = file_states(files)
    identity = dataset_identity(files, root)
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "srdata-content" / identity["content"][:32]
    loaded = load(str(cache))
    try:
        after = file_states(files)
    except FileNotFoundError as err:
        raise DatasetLoadError(f"{err.filename} was removed while it was being read") from None
    changed = sorted(f for f, state in after.items() if before[f] != state)
    if changed:
        raise DatasetLoadError(f"{changed[0]} changed while it was being read; run again once nothing writes to it")
    return loaded, identity


def _load(dataset: str, split: str) -> tuple[Any, dict[str, Any]]:
    import datasets

    dataset = local_dataset(dataset)
    files = [f.strip() for f in dataset.split(",")] if "," in dataset else [dataset]
    suffixes = {Path(f).suffix.lower() for f in files}
    path = Path(dataset)
    if path.is_dir():
        contents = local_dataset_files(dataset) or []
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            # Arrow files read in place (memory-mapped): no cache to key, only the content to record.
            loaded, identity = _content_keyed(contents, path, lambda cache: datasets.load_from_disk(str(path)))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DatasetLoadError(
                        f"split '{split}' is not in {dataset}; available splits: {', '.join(loaded)} (use --split)"
                    )
                return loaded[split], identity
            return loaded, identity
        return _content_keyed(contents, path, lambda cache: _with_split(lambda: datasets.load_dataset(str(path), cache_dir=cache), dataset, split))
    if suffixes <= set(DATA_FILE_BUILDERS) and len({DATA_FILE_BUILDERS[s] for s in suffixes}) == 1:
        missing = [f for f in files if not glob.glob(f)]
        if missing:
            raise DatasetLoadError(f"data file not found: {', '.join(missing)}")
        builder = DATA_FILE_BUILDERS[suffixes.pop()]
        paths = sorted({m for f in files for m in glob.glob(f)})
        empty = [f for f in paths if Path(f).stat().st_size < 4096 and not Path(f).read_bytes().strip()]
        if empty:
            raise DatasetLoadError(f"{', '.join(empty)} is empty: nothing to score")
        if builder == "json":  # datasets reads undecodable bytes and lone surrogates without a word: check first
            problem = next((p for p in map(_text_problem, paths) if p), None)
            if problem:
                raise DatasetLoadError(f"could not read {dataset} as json: {problem}")
        # CSV has no null: an empty field is an empty string, as in every other format
        # (pandas would read it as NaN, and the row would be refused as a null response).
        options = {"keep_default_na": False} if builder == "csv" else {}
        try:
            # Local files always form a single split, whatever --split says.
            loaded, identity = _content_keyed(
                [Path(p) for p in paths], None,
                lambda cache: datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache, **options),
            )
        except DatasetLoadError:
            raise
        except Exception as err:
            if "corresponds to no data" in str(err):  # datasets' words for an empty file
                raise DatasetLoadError(f"{dataset} has 0 rows: nothing to score") from err
            problem = _json_problem(paths) if builder == "json" else None
            cause = problem or _error_text(err)
            raise DatasetLoadError(f"could not read {dataset} as {builder}: {cause}") from err
        if builder == "json" and _column_style(loaded):
            raise DatasetLoadError(
                f"{dataset} looks like one object with a list per column ({', '.join(loaded.column_names)}); write one "
                "object per line (JSONL) or a list of records ([{...}, {...}])"
            )
        return loaded, identity
    if path.exists():
        raise DatasetLoadError(
            f"{dataset} is neither a save_to_disk folder nor a .jsonl/.json/.parquet/.csv file"
        )
    if not HUB_ID.match(dataset):
        raise DatasetLoadError(f"dataset {dataset!r} not found: no such file or folder")
    loaded = _from_hub(dataset, split)
    return loaded, {"hub": dataset, "fingerprint": getattr(loaded, "_fingerprint", None)}


def local_dataset(dataset: str) -> str:
    """``dataset`` with every ``file://`` part made a path and every remote part (``s3://...``) copied into a local folder.

    A remote file, glob or folder is downloaded whole into srdata's staging folder for it
    (:func:`srdata.run.storage.staging_folder`), and read from there like a local one: its
    identity is its content, checked the same way. A dataset of both kinds is refused.

    Example:
        >>> local_dataset("file:///data/train.jsonl")
        '/data/train.jsonl'
    """
    from srdata.run.storage import is_remote, parse_location, scheme_of

    parts = [p.strip() for p in dataset.split(",")]
    if not any(scheme_of(p) for p in parts):
        return dataset
    remote = [p for p in parts if is_remote(p)]
    if remote and len(remote) != len(parts):
        raise DatasetLoadError(f"dataset {dataset} mixes remote and local files; give files of one place")
    if not remote:
        return ",".join(str(parse_location(p, "dataset").local) for p in parts)
    from srdata.run.remote_data import fetch_dataset

    return fetch_dataset(remote)


def _column_style(ds: Any) -> bool:
    """One record whose every field is a list of plain values: a table written column by column."""
    if len(ds) != 1 or not ds.column_names:
        return False
    record = ds[0]
    return all(isinstance(v, list) and not any(isinstance(x, (list, dict)) for x in v) for v in record.values())


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _text_problem(path: str) -> str | None:
    """Undecodable bytes, or a lone surrogate escape (``"\\ud800"``), in a JSON file, with its line.

    Surrogate escapes are common (``json.dumps`` writes emoji as a pair of them), so the
    exact check, which parses the file in Python, runs only on files that hold some.
    """
    problem, escapes = _utf8_problem(path)
    return problem or (_json_problem([path]) if escapes else None)


def _utf8_problem(path: str) -> tuple[str | None, bool]:
    """Where a file stops being UTF-8 text (its line and byte offset), and whether it holds surrogate escapes.

    Read in blocks cut at line ends, so a large file is never held in memory at once.
    """
    newline, line, offset, rest, escapes = b"\n", 1, 0, b"", False
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            data = rest + block
            cut = data.rfind(newline) + 1 if block else len(data)
            chunk, rest = data[:cut], data[cut:]
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as err:
                where = line + chunk[: err.start].count(newline)
                return (f"{path} line {where} is not UTF-8 text (undecodable byte at offset {offset + err.start}: "
                        f"{chunk[err.start]:#04x}); is it really a JSON file saved as UTF-8?"), escapes
            escapes = escapes or SURROGATE_ESCAPE.search(chunk) is not None
            line, offset = line + chunk.count(newline), offset + len(chunk)
            if not block:
                return None, escapes


def _error_text(err: BaseException) -> str:
    """The most specific message in an exception chain (datasets wraps the cause in a vague one)."""
    texts = []
    while err is not None:
        texts.append(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        err = err.__cause__ or err.__context__
    return texts[-1] if len(texts) > 1 else texts[0]


def _json_problem(paths: list[str]) -> str | None:
    """Find where a JSON / JSON-lines file is broken: the file, the line, and what is wrong."""
    import json

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"key {twice[0]!r} appears twice in one object")
        return dict(pairs)

    def not_unicode(record: Any) -> bool:  # a lone surrogate escape ("\ud800") decodes, but is no text
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    surrogate = "holds a lone surrogate escape (such as \\ud800) in a string, which is not valid Unicode text; fix or drop it"
    for path in paths:
        problem, _ = _utf8_problem(path)
        if problem:
            return problem
        text = Path(path).read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):  # one JSON document (a list of records)
            try:
                records = json.loads(text, object_pairs_hook=no_duplicates)
            except ValueError as err:
                return f"{path}: {err}"
            bad = next((i for i, r in enumerate(records) if not_unicode(r)), None)
            if bad is not None:
                return f"{path} record {bad} {surrogate}"
            continue
        for number, line in enumerate(text.split("\n"), start=1):  # JSON lines end at \n only (not at U+2028)
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=no_duplicates)
            except ValueError as err:
                return f"{path} line {number} is not a valid JSON object: {err}"
            if not isinstance(record, dict):
                return f"{path} line {number} holds a JSON {type(record).__name__}, not an object with one field per column"
            if not_unicode(record):
                return f"{path} line {number} {surrogate}"
    return None


def header_warnings(dataset: str) -> list[str]:
    """Problems of a CSV header that loading hides: a column name given twice is renamed ``name.1``.

    Example:
        >>> header_warnings("data.jsonl")
        []
    """
    import csv

    warnings = []
    for path in sorted({m for f in dataset.split(",") for m in glob.glob(f.strip()) if m.lower().endswith(".csv")}):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            warnings.append(
                f"{path}: column(s) {', '.join(repr(n) for n in twice)} appear more than once in the header; "
                f"the later copies are read as {', '.join(repr(n + '.1') for n in twice)}"
            )
    return warnings


def _from_hub(dataset: str, split: str):
    import datasets
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        hint = "HF_HUB_OFFLINE is set"
    else:
        hint = "the hub could not be reached"
    try:
        return datasets.load_dataset(dataset, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DatasetLoadError(f"split '{split}' not found in {dataset}: {err}") from err
        raise DatasetLoadError(f"could not load {dataset!r} from the Hugging Face hub ({hint}): {err}") from err
    except Exception as err:
        raise DatasetLoadError(
            f"{dataset!r} is not a local file or folder, and loading it from the Hugging Face hub failed "
            f"({hint}: {type(err).__name__}). Offline, pass a local data file or a save_to_disk folder."
        ) from err


def _with_split(load, dataset: str, split: str):
    import datasets

    loaded = load()
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetLoadError(f"split '{split}' is not in {dataset}; available splits: {', '.join(loaded)} (use --split)")
        return loaded[split]
    return loaded


def resolve_columns(
    column_names: list[str],
    prompt_column: str | None = None,
    response_column: str | None = None,
    input_column: str | None = None,
    messages_column: str | None = None,
) -> ColumnMapping:
    """Use the given column names, or detect a common layout when they are not given.

    Example:
        >>> resolve_columns(["instruction", "input", "output"]).describe()
        "prompt='instruction', response='output', input='input' (auto-detected)"
    """
    available = ", ".join(column_names) or "(none)"
    given = (("--prompt-column", prompt_column), ("--response-column", response_column), ("--input-column", input_column),
             ("--messages-column", messages_column))
    for role, name in given:
        if name is not None and name not in column_names:
            raise DatasetLoadError(f"{role} '{name}' is not a column of the dataset; available columns: {available}")
    if messages_column is not None:
        if prompt_column or response_column or input_column:
            raise DatasetLoadError("--messages-column holds the whole conversation: pass it alone, or --prompt-column and "
                                   "--response-column (and --input-column) instead")
        return ColumnMapping(messages_column=messages_column)
    if prompt_column and response_column:
        return ColumnMapping(prompt_column, response_column, input_column)
    if (prompt_column is None) != (response_column is None):
        # One column given: the other is the first common name for it that the data has.
        for p, i, r in KNOWN_LAYOUTS:
            p, r = prompt_column or p, response_column or r
            if p in column_names and r in column_names and p != r:
                chosen_input = input_column or (i if i in column_names and i not in (p, r) else None)
                return ColumnMapping(p, r, chosen_input, detected=True)
    if prompt_column is None and response_column is None and input_column is None:
        for name in MESSAGE_COLUMNS:
            if name in column_names:
                return ColumnMapping(messages_column=name, detected=True)
    for p, i, r in KNOWN_LAYOUTS:
        if (prompt_column or p) == p and (response_column or r) == r and p in column_names and r in column_names:
            chosen_input = input_column or (i if i in column_names else None)
            return ColumnMapping(p, r, chosen_input, detected=True)
    raise DatasetLoadError(
        f"could not tell which columns hold the prompt and the response (available columns: {available}); "
        "pass --prompt-column and --response-column"
    )
