"""Images in object storage: scan and extract from s3:// against a real S3 server (SeaweedFS's
``weed mini``, started here), the same features and predictions as the same files on disk.

The quick tests check the pure pieces (URIs, listing rules, options, secrets); the others start
one server for the module and drive the real ``imgfeat`` command against it.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from s3server import SECRET_KEY, running_server

from imgfeat.core import stores
from imgfeat.core.errors import ConfigError
from imgfeat.scan.listing import SKIP_FOLDER_MARKER, skip_reason
from imgfeat.scan.walk import SKIP_HIDDEN, SKIP_NON_IMAGE, WalkOptions

IMGFEAT = [sys.executable, "-m", "imgfeat.cli"]
LITE = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--input-size", "96"]


# ---------------------------------------------------------------- pure pieces (quick)


@pytest.mark.quick
@pytest.mark.parametrize(
    "uri, parts",
    [
        ("s3://photos", ("s3", "photos", "")),
        ("s3://photos/", ("s3", "photos", "")),
        ("s3://photos/a/b/", ("s3", "photos", "a/b")),
        ("gs://bkt//x", ("gs", "bkt", "x")),
        ("az://container/p", ("az", "container", "p")),
    ],
)
def test_locations_parse_and_join_like_folders(uri, parts):
    loc = stores.parse_location(uri)
    assert (loc.scheme, loc.bucket, loc.prefix) == parts
    child = loc / "train/cat/1.jpg"
    assert child == f"{loc.uri}/train/cat/1.jpg" and child.name == "1.jpg" and child.suffix == ".jpg"
    assert child.as_posix() == str(child) and not hasattr(child, "__fspath__")
    assert stores.is_uri(child) and not stores.is_uri("/data/photos") and not stores.is_uri(Path("s3:/x"))


@pytest.mark.quick
@pytest.mark.parametrize("bad", ["ftp://host/x", "s3://", "s3:///prefix", "s3://b/../x", "s3://b/./x"])
def test_a_bad_uri_names_the_value_and_what_is_allowed(bad):
    with pytest.raises(ConfigError) as err:
        stores.parse_location(bad, "scan root")
    assert bad in str(err.value) and ("s3://" in str(err.value))


@pytest.mark.quick
def test_listing_skips_keys_by_the_walks_rules():
    opts = WalkOptions()
    assert skip_reason("train/cat/1.JPG", opts) is None
    assert skip_reason("train/cat/", opts) == SKIP_FOLDER_MARKER
    assert skip_reason("train/.cache/1.jpg", opts) == SKIP_HIDDEN
    assert skip_reason(".1.jpg", opts) == SKIP_HIDDEN
    assert skip_reason("a//b.jpg", opts) == SKIP_HIDDEN  # an empty part: no folder has that name
    assert skip_reason("notes.txt", opts) == SKIP_NON_IMAGE
    assert skip_reason("notes.txt", WalkOptions(keep_non_images=True)) is None


@pytest.mark.quick
def test_storage_options_parse_and_secrets_never_show(monkeypatch):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        stores.parse_storage_options(["region"])
    opts = stores.parse_storage_options(["Region=eu-west-1", "aws_secret_access_key=s3cr3t-value"])
    assert opts == {"region": "eu-west-1", "aws_secret_access_key": "s3cr3t-value"}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-xyz")
    stores.set_storage_options(opts)
    try:
        text = "failed with s3cr3t-value and env-secret-xyz at https://h/x?X-Amz-Signature=abcdef&y=1"
        clean = stores.redact(text)
        assert "s3cr3t-value" not in clean and "env-secret-xyz" not in clean and "abcdef" not in clean
        assert stores.public_options() == {"aws_secret_access_key": "***", "region": "eu-west-1"}
    finally:
        stores.set_storage_options({})


@pytest.mark.quick
def test_a_job_files_storage_table_and_bucket_roots(tmp_path):
    from imgfeat.run.jobfile import load_job

    job = tmp_path / "job.toml"
    job.write_text(
        '[storage]\nregion = "eu-west-1"\nallow_http = true\n'
        '[datasets.photos]\nroot = "s3://bkt/photos"\n'
        '[features.lite]\nbackbone = "efficientnet_lite0"\n'
    )
    spec = load_job(job)
    assert spec.storage == {"region": "eu-west-1", "allow_http": "true"}
    assert spec.datasets["photos"]["root"] == "s3://bkt/photos"  # not made relative to the job file
    job.write_text("[storage]\nregion = [1, 2]\n")
    with pytest.raises(ConfigError, match=r"\[storage\] region"):
        load_job(job)


@pytest.mark.quick
@pytest.mark.parametrize(
    "text, says",
    [
        ("Error performing PUT http://169.254.169.254/latest/api/token: status code: 403", "no credentials found"),
        (
            "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code>",
            "bucket does not exist",
        ),
        ("status code: 403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code>", "secret key was refused"),
        ("status code: 403 Forbidden: <Error><Code>InvalidAccessKeyId</Code>", "access key is unknown"),
        ("Error performing GET http://h/b, after 8 retries - HTTP error: error sending request", "cannot be reached"),
        ("status code: 503 Service Unavailable: <Error><Code>SlowDown</Code>", "HTTP 503 SlowDown"),
    ],
)
def test_a_stores_refusal_is_explained_in_one_line(text, says):
    from obstore.exceptions import GenericError

    line = stores.explain(GenericError(text + "\n\nDebug source: ..."), "s3://b/p")
    assert line.startswith("s3://b/p: ") and says in line and "\n" not in line


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("s3")) as srv:
        import obstore
        from obstore.store import from_url

        os.environ.update(srv.env)
        # the bucket workspaces live in (a workspace's bucket must exist: imgfeat never creates buckets)
        obstore.put(from_url("s3://workspaces", client_options={"allow_http": True}), "README", b"test bucket")
        yield srv


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small photo tree (two classes, train/test) plus files a scan must skip or flag."""
    from imgfeat.tools.samples import PhotoSetSpec, make_photo_set

    base = tmp_path_factory.mktemp("photos") / "photos"
    spec = PhotoSetSpec(classes=(("cat", "chelsea"), ("rocket", "rocket")), per_class=8, min_side=48, max_side=96)
    make_photo_set(base, spec)
    (base / ".hidden.jpg").write_bytes(b"not scanned")
    (base / "notes.txt").write_text("not an image")
    (base / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return base


def _env(server, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **server.env, "PYTHONWARNINGS": "ignore", **extra}


def imgfeat(env, ws, *args, code=0, process=False):
    """``imgfeat ARGS --workspace WS --json`` with ``env`` as the whole environment: in this process
    (the same ``main`` the command runs, without paying an interpreter and TensorFlow start per call),
    or, ``process=True``, as a real process. Returns (the --json object, stderr)."""
    argv = [*args, "--workspace", str(ws), "--json"]
    if process:
        r = subprocess.run([*IMGFEAT, *argv], capture_output=True, text=True, env=env)
        rc, out, err = r.returncode, r.stdout, r.stderr
    else:
        rc, out, err = _in_process(env, argv)
    assert rc == code, err[-3000:]
    assert SECRET_KEY not in out + err
    return json.loads(out.strip().splitlines()[-1]), err


def _in_process(env: dict[str, str], argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from imgfeat.cli.main import main

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stores.set_storage_options({})
    return rc, out.getvalue(), err.getvalue()


def upload(server, tree: Path, uri: str) -> None:
    import obstore
    from obstore.store import from_url

    loc = stores.parse_location(uri)
    os.environ.update(server.env)
    store = from_url(f"s3://{loc.bucket}", client_options={"allow_http": True})
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            obstore.put(store, loc.key(path.relative_to(tree).as_posix()), path.read_bytes())


def _features(ws: Path) -> tuple[list[str], np.ndarray]:
    folder = next(p for p in (ws / "features").iterdir() if p.name.startswith("efficientnet"))
    table = pq.read_table(folder).sort_by("image_id")
    return table.column("image_id").to_pylist(), np.stack(table.column("feature").to_numpy(zero_copy_only=False))


def test_bucket_images_give_the_same_manifest_features_and_predictions_as_the_files(server, photos, tmp_path):
    upload(server, photos, "s3://photos/set1")
    env = _env(server)
    out = {}
    for name, root in (("disk", str(photos)), ("bucket", "s3://photos/set1")):
        ws = tmp_path / name
        scan, _ = imgfeat(env, ws, "scan", root, "--dataset", "d")
        ext, _ = imgfeat(env, ws, "extract", "--dataset", "d", *LITE)
        train, _ = imgfeat(env, ws, "train", "--dataset", "d", "--featureset", ext["featureset"], "--head", "logreg")
        pred, _ = imgfeat(env, ws, "predict", "--head", train["head_id"], "--dataset", "d")
        out[name] = (ws, scan, ext, train, pred)
    (dws, dscan, dext, dtrain, _), (bws, bscan, bext, btrain, _) = out["disk"], out["bucket"]
    for key in ("files", "ok", "errors", "status", "splits", "labels", "skipped"):
        assert dscan[key] == bscan[key], key
    assert bscan["root"] == "s3://photos/set1" and bscan["skipped"] == {"hidden": 1, "non_image": 1}
    assert dext["featureset"] == bext["featureset"] and bext["extracted"] == dext["extracted"] == 16
    assert bext["errors"]["by_code"] == {"not_an_image": 1}
    ids_d, fd = _features(dws)
    ids_b, fb = _features(bws)
    assert ids_d == ids_b and fd.std(axis=0).mean() > 1e-3  # features that carry signal ...
    np.testing.assert_array_equal(fd, fb)  # ... and are the same numbers
    assert dtrain["head_id"] == btrain["head_id"]  # names do not depend on where images live
    cols = ["image_id", "path", "pred_label", "pred_score"]
    pd_ = pq.read_table(dws / "predictions" / dtrain["head_id"], columns=cols).sort_by("image_id").to_pylist()
    pb_ = pq.read_table(bws / "predictions" / btrain["head_id"], columns=cols).sort_by("image_id").to_pylist()
    assert pd_ == pb_ and len(pd_) == 16
    manifest = pq.read_table(bws / "datasets" / "d" / "manifest.parquet")
    assert all(e and e.startswith('"') for e in manifest.column("etag").to_pylist())
    assert set(manifest.column("path").to_pylist()) == set(
        pq.read_table(dws / "datasets" / "d" / "manifest.parquet").column("path").to_pylist()
    )


def test_a_bucket_rescan_reads_only_changed_objects_and_an_overwrite_of_the_same_size_counts(server, photos, tmp_path):
    upload(server, photos, "s3://photos/rescan")
    env, ws = _env(server), tmp_path / "ws"
    first, _ = imgfeat(env, ws, "scan", "s3://photos/rescan", "--dataset", "d")
    again, _ = imgfeat(env, ws, "scan", "s3://photos/rescan", "--dataset", "d")
    assert again["hashed"] == 0 and again["unchanged"] == first["files"]
    import obstore
    from obstore.store import from_url

    store = from_url("s3://photos", client_options={"allow_http": True})
    cat = sorted(p for p in (photos / "train" / "cat").glob("*.jpg") if p.name != "broken.jpg")
    victim = "rescan/" + cat[0].relative_to(photos).as_posix()
    data = bytearray(cat[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the ETag (and maybe the second) tells
    obstore.put(store, victim, bytes(data))
    obstore.delete(store, "rescan/" + cat[1].relative_to(photos).as_posix())
    third, _ = imgfeat(env, ws, "scan", "s3://photos/rescan", "--dataset", "d")
    assert third["changed"] == 1 and third["removed"] == 1 and third["hashed"] == 1, third


def test_a_missing_object_is_an_error_row_and_the_next_run_extracts_it_once_back(server, photos, tmp_path):
    upload(server, photos, "s3://photos/missing")
    env, ws = _env(server), tmp_path / "ws"
    imgfeat(env, ws, "scan", "s3://photos/missing", "--dataset", "d")
    import obstore
    from obstore.store import from_url

    store = from_url("s3://photos", client_options={"allow_http": True})
    rel = sorted(p for p in (photos / "train" / "rocket").glob("*.jpg"))[0].relative_to(photos).as_posix()
    obstore.delete(store, "missing/" + rel)
    ext, _ = imgfeat(env, ws, "extract", "--dataset", "d", *LITE)
    assert ext["extracted"] == 15 and ext["errors"]["by_code"] == {"not_an_image": 1, "vanished": 1}
    obstore.put(store, "missing/" + rel, (photos / rel).read_bytes())
    again, _ = imgfeat(env, ws, "extract", "--dataset", "d", *LITE)
    assert again["extracted"] == 1
    ids, _ = _features(ws)
    assert len(ids) == len(set(ids)) == 16


def test_wrong_credentials_or_a_missing_bucket_is_one_line_exit_2_before_any_work(server, photos, tmp_path):
    ws = tmp_path / "never"
    cases = [
        (_env(server, AWS_SECRET_ACCESS_KEY="wrong-secret-value"), "s3://photos/set1", "secret key was refused"),
        (_env(server, AWS_ACCESS_KEY_ID="nobody"), "s3://photos/set1", "access key"),
        (_env(server), "s3://no-such-bucket/x", "bucket does not exist"),
    ]
    for env, root, says in cases:
        r = subprocess.run(
            [*IMGFEAT, "scan", root, "--dataset", "d", "--workspace", str(ws)], capture_output=True, text=True, env=env
        )
        assert r.returncode == 2, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0] and root in lines[0], r.stderr
        assert "wrong-secret-value" not in r.stderr and SECRET_KEY not in r.stderr
    assert not ws.exists()  # nothing written


def test_a_stopped_server_is_a_clear_error_and_the_rerun_resumes(server, photos, tmp_path):
    upload(server, photos, "s3://photos/outage")
    env, ws = _env(server), tmp_path / "ws"
    imgfeat(env, ws, "scan", "s3://photos/outage", "--dataset", "d")
    server.stop()
    try:
        _, err = imgfeat(env, ws, "extract", "--dataset", "d", *LITE, code=1)
        assert "cannot be reached" in err and "s3://photos/outage/" in err
        assert "Traceback" not in err
    finally:
        server.start()
    ext, _ = imgfeat(env, ws, "extract", "--dataset", "d", *LITE)
    assert ext["extracted"] == 16
    errors = pq.read_table(ws / "features" / "_errors").column("error_code").to_pylist()
    assert "vanished" not in errors and "unreadable" not in errors  # the outage left no error rows


class _Throttle(http.server.ThreadingHTTPServer):
    """A proxy in front of the real server that answers every other GET of an object with
    503 SlowDown, as S3 does under load: the client must retry (with backoff) and get it."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.served_503 = 0
        self.gets = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ThrottleHandler)


class _ThrottleHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _forward(self) -> None:
        srv: _Throttle = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "GET" and "list-type" not in self.path:
            with srv.lock:
                srv.gets += 1
                throttle = srv.gets % 2 == 1
                srv.served_503 += throttle
            if throttle:
                msg = b'<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>'
                self.send_response(503)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
        conn = http.client.HTTPConnection(srv.upstream, timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


def test_throttling_is_answered_by_retries(server, photos, tmp_path):
    upload(server, photos, "s3://photos/throttled")
    proxy = _Throttle(server.endpoint)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        env = _env(server, AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.server_address[1]}")
        ws = tmp_path / "ws"
        scan, _ = imgfeat(env, ws, "scan", "s3://photos/throttled", "--dataset", "d")
        ext, _ = imgfeat(env, ws, "extract", "--dataset", "d", *LITE)
    finally:
        proxy.shutdown()
    assert scan["ok"] == 16 and scan["errors"] == 1 and ext["extracted"] == 16
    assert proxy.served_503 >= 16  # every object was refused once, and fetched on a retry


def test_secrets_stay_out_of_the_run_record_and_the_manifest(server, photos, tmp_path):
    upload(server, photos, "s3://photos/secret")
    env, ws = _env(server), tmp_path / "ws"
    del env["AWS_SECRET_ACCESS_KEY"]  # the secret given as a flag instead
    scan, _ = imgfeat(
        env,
        ws,
        "scan",
        "s3://photos/secret",
        "--dataset",
        "d",
        "--storage-option",
        f"aws_secret_access_key={SECRET_KEY}",
    )
    assert scan["ok"] == 16
    written = b"".join(p.read_bytes() for p in ws.rglob("*") if p.is_file())
    assert SECRET_KEY.encode() not in written


@pytest.fixture(autouse=True, scope="module")
def _cleanup_env():
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    yield
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    os.environ.update(saved)


def test_bench_measures_the_object_store_input_limit(server, photos, tmp_path):
    upload(server, photos, "s3://photos/bench")
    env = _env(server)
    out, _ = imgfeat(
        env,
        tmp_path / "ws",
        "bench",
        "--backbone",
        "mobilenet_v3_small",
        "--input-size",
        "32",
        "--images",
        "s3://photos/bench",
        "--batch-size",
        "8",
    )
    assert out["images"] == 16  # the objects that scanned ok; the broken one is no image
    assert set(out["images_per_s"]) == {"input", "forward", "extract"}  # no tutorial: it reads folders only
    assert out["extract_inner"]["extracted"] == 16 and out["end_to_end_over_limit"] > 0


def test_sigkill_mid_extract_from_a_bucket_and_the_rerun_ends_identical(server, photos, tmp_path):
    import signal
    import time

    upload(server, photos, "s3://photos/killed")
    env = _env(server)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for ws in (clean, killed):
        imgfeat(env, ws, "scan", "s3://photos/killed", "--dataset", "d")
    imgfeat(env, clean, "extract", "--dataset", "d", *LITE)
    small = [*LITE, "--shard-size", "2", "--batch-size", "2"]
    cmd = [*IMGFEAT, "extract", "--dataset", "d", *small, "--workspace", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((killed / "features").glob("efficientnet*/part-*.parquet"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extract ended before it could be killed mid-run"
    out, _ = imgfeat(env, killed, "extract", "--dataset", "d", *small)
    assert out["reused"] >= 2 and out["reused"] + out["extracted"] == 16
    ids_c, fc = _features(clean)
    ids_k, fk = _features(killed)
    assert ids_k == ids_c and len(set(ids_k)) == 16  # no duplicates, nothing missing
    np.testing.assert_array_equal(fc, fk)


def test_weights_from_a_bucket_are_the_same_weights_as_the_file(server, photos, tmp_path, monkeypatch):
    import keras

    upload(server, photos, "s3://photos/weights")
    keras.utils.set_random_seed(3)
    model = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", include_preprocessing=False
    )
    path = tmp_path / "mine.weights.h5"
    model.save_weights(path)
    import obstore
    from obstore.store import from_url

    obstore.put(
        from_url("s3://photos", client_options={"allow_http": True}), "models/mine.weights.h5", path.read_bytes()
    )
    env = _env(server, IMGFEAT_CACHE=str(tmp_path / "cache"))
    outs = []
    for name, weights in (("file", str(path)), ("bucket", "s3://photos/models/mine.weights.h5")):
        ws = tmp_path / name
        imgfeat(env, ws, "scan", "s3://photos/weights", "--dataset", "d")
        out, _ = imgfeat(
            env,
            ws,
            "extract",
            "--dataset",
            "d",
            "--backbone",
            "mobilenet_v3_small",
            "--input-size",
            "32",
            "--weights",
            weights,
        )
        outs.append((ws, out))
    (fws, fout), (bws, bout) = outs
    assert fout["featureset"] == bout["featureset"]  # the weights are named by their bytes, not their place
    _, ff = _features_named(fws, fout["featureset"])
    _, fb = _features_named(bws, bout["featureset"])
    assert ff.std(axis=0).mean() > 0
    np.testing.assert_array_equal(ff, fb)
    assert list((tmp_path / "cache").rglob("mine.weights.h5"))  # downloaded once, into the cache


def _features_named(ws: Path, featureset: str) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(ws / "features" / featureset).sort_by("image_id")
    return table.column("image_id").to_pylist(), np.stack(table.column("feature").to_numpy(zero_copy_only=False))


# ---------------------------------------------------------------- a workspace in a bucket


def _bucket_rows(server, uri: str) -> list[str]:
    """The image ids a plain pyarrow reader finds in a bucket folder (it knows nothing of records)."""
    import pyarrow.fs as pafs

    os.environ.update(server.env)
    fs, path = pafs.FileSystem.from_uri(uri)
    return pq.read_table(path, filesystem=fs).column("image_id").to_pylist()


def _bucket_keys(prefix: str) -> list[str]:
    import obstore
    from obstore.store import from_url

    loc = stores.parse_location(prefix)
    store = from_url(f"s3://{loc.bucket}", client_options={"allow_http": True})
    return sorted(m["path"] for page in obstore.list(store, prefix=loc.prefix + "/") for m in page)


def test_a_workspace_in_a_bucket_gives_what_a_folder_gives_and_readers_see_exactly_its_rows(server, photos, tmp_path):
    upload(server, photos, "s3://photos/wsimages")
    ws_uri = "s3://workspaces/team"
    env_a = _env(server, IMGFEAT_CACHE=str(tmp_path / "machine-a"))
    env_b = _env(server, IMGFEAT_CACHE=str(tmp_path / "machine-b"))
    local = tmp_path / "local"
    outs = {}
    # bucket images into the bucket workspace; the same photos from disk into a folder
    for name, ws, root in (("bucket", ws_uri, "s3://photos/wsimages"), ("local", str(local), str(photos))):
        env = env_a
        imgfeat_at(env, ws, "scan", root, "--dataset", "d")
        ext = imgfeat_at(env, ws, "extract", "--dataset", "d", *LITE)
        train = imgfeat_at(env, ws, "train", "--dataset", "d", "--featureset", ext["featureset"], "--head", "logreg")
        imgfeat_at(env, ws, "predict", "--head", train["head_id"], "--dataset", "d")
        outs[name] = (ext, train)
    (ext, train), (lext, ltrain) = outs["bucket"], outs["local"]
    assert ext["featureset"] == lext["featureset"] and train["head_id"] == ltrain["head_id"]
    fs = ext["featureset"]
    # a plain reader of the bucket folder: exactly the rows, once each, the same numbers
    ids = _bucket_rows(server, f"{ws_uri}/features/{fs}")
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 16
    _, local_feats = _features_named(local, fs)
    import pyarrow.fs as pafs

    s3, path = pafs.FileSystem.from_uri(f"{ws_uri}/features/{fs}")
    bucket_table = pq.read_table(path, filesystem=s3).sort_by("image_id")
    np.testing.assert_array_equal(np.stack(bucket_table.column("feature").to_numpy(zero_copy_only=False)), local_feats)
    pred_ids = _bucket_rows(server, f"{ws_uri}/predictions/{train['head_id']}")
    assert len(pred_ids) == len(set(pred_ids)) == 16
    cols = ["image_id", "label", "split", "pred_label", "pred_score"]
    s3p, ppath = pafs.FileSystem.from_uri(f"{ws_uri}/predictions/{train['head_id']}")
    in_bucket = pq.read_table(ppath, filesystem=s3p, columns=cols).sort_by("image_id").to_pylist()
    on_disk = pq.read_table(local / "predictions" / train["head_id"], columns=cols).sort_by("image_id").to_pylist()
    assert in_bucket == on_disk
    import polars as pl

    df = pl.read_parquet(
        f"{ws_uri}/features/{fs}/*.parquet",
        storage_options={"aws_endpoint_url": server.endpoint, "aws_allow_http": "true", "aws_region": "us-east-1"},
    )
    assert df.height == 16
    keys = _bucket_keys(ws_uri)
    assert not [k for k in keys if ".staging" in k or k.endswith(".tmp") or "/.mirror/" in k]
    assert [k for k in keys if f"features/{fs}/" in k] and all(
        k.rsplit("/", 1)[1].startswith("part-") for k in keys if f"/features/{fs}/" in k
    )
    # another machine (its own cache) finds everything there: no model work, the same head
    again = imgfeat_at(env_b, ws_uri, "extract", "--dataset", "d", *LITE)
    assert again["extracted"] == 0 and again["reused"] == 16
    head = imgfeat_at(env_b, ws_uri, "train", "--dataset", "d", "--featureset", fs, "--head", "logreg")
    assert head["head_id"] == train["head_id"] and head["reused"] is True


def imgfeat_at(env, ws: str, *args, code=0, process=False):
    return imgfeat(env, ws, *args, code=code, process=process)[0]


def test_sigkill_mid_extract_into_a_bucket_workspace_and_reruns_on_either_machine_end_identical(
    server, photos, tmp_path
):
    import signal
    import time

    upload(server, photos, "s3://photos/wskill")
    ws_uri = "s3://workspaces/killed"
    # a short lease, so that machine B takes over the dead run's lock soon
    env_a = _env(server, IMGFEAT_CACHE=str(tmp_path / "machine-a"), IMGFEAT_LOCK_LEASE_S="4")
    env_b = _env(server, IMGFEAT_CACHE=str(tmp_path / "machine-b"), IMGFEAT_LOCK_LEASE_S="4")
    clean = tmp_path / "clean"
    imgfeat(env_a, clean, "scan", "s3://photos/wskill", "--dataset", "d")
    imgfeat(env_a, clean, "extract", "--dataset", "d", *LITE)
    imgfeat_at(env_a, ws_uri, "scan", "s3://photos/wskill", "--dataset", "d")
    small = [*LITE, "--shard-size", "2", "--batch-size", "2"]
    cmd = [*IMGFEAT, "extract", "--dataset", "d", *small, "--workspace", ws_uri]
    proc = subprocess.Popen(cmd, env=env_a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len([k for k in _bucket_keys(ws_uri) if "/features/efficientnet" in k and k.endswith(".parquet")]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "extract ended before it could be killed mid-run"
    # the lock object of the dead run is still there: machine B takes it over once its lease ends
    out = imgfeat_at(env_b, ws_uri, "extract", "--dataset", "d", *small, "--wait", "60")
    assert out["reused"] >= 2 and out["reused"] + out["extracted"] == 16
    again = imgfeat_at(env_a, ws_uri, "extract", "--dataset", "d", *small)  # the killed machine, later
    assert again["extracted"] == 0
    fs = out["featureset"]
    ids = _bucket_rows(server, f"{ws_uri}/features/{fs}")
    ids_clean, feats_clean = _features_named(clean, fs)
    assert sorted(ids) == ids_clean  # exactly the rows: no duplicates, nothing missing
    import pyarrow.fs as pafs

    s3, path = pafs.FileSystem.from_uri(f"{ws_uri}/features/{fs}")
    table = pq.read_table(path, filesystem=s3).sort_by("image_id")
    np.testing.assert_array_equal(np.stack(table.column("feature").to_numpy(zero_copy_only=False)), feats_clean)


def test_a_live_lock_in_the_bucket_is_refused_naming_its_holder(server, photos, tmp_path, monkeypatch):
    import time

    import obstore
    from obstore.store import from_url

    upload(server, photos, "s3://photos/wslock")
    ws_uri = "s3://workspaces/locked"
    env = _env(server, IMGFEAT_CACHE=str(tmp_path / "machine-a"))
    imgfeat_at(env, ws_uri, "scan", "s3://photos/wslock", "--dataset", "d")
    store = from_url("s3://workspaces", client_options={"allow_http": True})
    holder = {"holder": "other-host:4242:abc", "expires": time.time() + 600, "lease_s": 30}
    obstore.put(store, "locked/.locks/dataset-d.lock", json.dumps(holder).encode())
    r = subprocess.run(
        [*IMGFEAT, "scan", "s3://photos/wslock", "--dataset", "d", "--workspace", ws_uri],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 1 and "other-host:4242" in r.stderr and "being written" in r.stderr, r.stderr
    holder["expires"] = time.time() - 1  # its holder died: the lease ran out
    obstore.put(store, "locked/.locks/dataset-d.lock", json.dumps(holder).encode())
    out = imgfeat_at(env, ws_uri, "scan", "s3://photos/wslock", "--dataset", "d")
    assert out["unchanged"] == 16 + 1
    assert "locked/.locks/dataset-d.lock" not in _bucket_keys("s3://workspaces/locked")  # released


@pytest.mark.ray
def test_ray_workers_read_bucket_images_and_write_into_a_bucket_workspace_without_the_drivers_disk(
    server, photos, tmp_path
):
    pytest.importorskip("ray")
    upload(server, photos, "s3://photos/wsray")
    ws_uri = "s3://workspaces/ray"
    env = _env(server, IMGFEAT_CACHE=str(tmp_path / "driver"))
    del env["AWS_SECRET_ACCESS_KEY"]  # only the flag carries it: the actors must get it from the driver
    secret = ["--storage-option", f"aws_secret_access_key={SECRET_KEY}"]
    local = tmp_path / "local"
    imgfeat(env, local, "scan", str(photos), "--dataset", "d", *secret)
    imgfeat(env, local, "extract", "--dataset", "d", *LITE, *secret)
    imgfeat_at(env, ws_uri, "scan", "s3://photos/wsray", "--dataset", "d", *secret)
    out = imgfeat_at(
        env, ws_uri, "extract", "--dataset", "d", *LITE, *secret, "--executor", "ray", "--ray-actors", "1", process=True
    )
    assert out["executor"] == "ray" and out["extracted"] == 16
    fs = out["featureset"]
    shards = [k for k in _bucket_keys(ws_uri) if f"/features/{fs}/" in k]
    assert shards and all("-ray-" in k for k in shards)  # written by the workers, straight into the bucket
    driver_mirror = tmp_path / "driver" / "workspaces" / "s3" / "workspaces" / "ray" / "features" / fs
    assert sorted(p.name for p in driver_mirror.glob("part-*.parquet")) == sorted(k.rsplit("/", 1)[1] for k in shards)
    ids_local, feats_local = _features_named(local, fs)
    import pyarrow.fs as pafs

    s3, path = pafs.FileSystem.from_uri(f"{ws_uri}/features/{fs}")
    table = pq.read_table(path, filesystem=s3).sort_by("image_id")
    assert table.column("image_id").to_pylist() == ids_local  # each image once
    np.testing.assert_array_equal(np.stack(table.column("feature").to_numpy(zero_copy_only=False)), feats_local)


def test_an_unusable_mirror_folder_is_one_line_naming_it(server, tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    env = _env(server, IMGFEAT_CACHE=str(blocker))
    _, err = imgfeat(env, "s3://workspaces/unusable", "ls", code=1)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "IMGFEAT_CACHE" in lines[0] and str(blocker) in lines[0], err
