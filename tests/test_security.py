"""Security: no remote code by default, secrets only through the environment and never in logs, metadata or
outputs, and config paths that cannot leave TULU_HOME. (The code sandbox has its own tests: test_sandbox.py.)"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from resources import LocalLauncher
from tulu_pipeline.generation.spec import BackendSpec, resolve_model_path
from tulu_pipeline.storage import Store, StorePathError

SECRET = "sk-planted-" + "7f3a9c1e5b2d4f6a8c0e"
REPO = Path(__file__).resolve().parent.parent


def test_remote_code_is_off_by_default_everywhere():
    assert BackendSpec(model="models/base_model").trust_remote_code is False
    from resources.generation import GenerationResource, JudgeResource

    assert GenerationResource().spec("models/base_model").trust_remote_code is False
    assert JudgeResource().spec().trust_remote_code is False
    offenders = []
    for path in [*REPO.joinpath("tulu_pipeline").rglob("*.py"), *REPO.joinpath("assets").rglob("*.py"),
                 *REPO.joinpath("resources").rglob("*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"trust_remote_code\s*=\s*True", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert offenders == []


def test_config_paths_cannot_leave_tulu_home(tmp_path):
    store = Store(str(tmp_path / "home"))
    for bad in ("../elsewhere", "/etc", "models/../../x", "a\\..\\b"):
        with pytest.raises(StorePathError):
            store.path(bad)
    for bad in ("../models/x", "/tmp/model", "models/../../x"):
        with pytest.raises(StorePathError):
            resolve_model_path(bad, store)
    with pytest.raises(StorePathError):
        store.write_json("../outside.json", {})
    with pytest.raises(StorePathError):
        store.read_bytes("/etc/passwd")
    assert not (tmp_path / "outside.json").exists()


class _KeyCheckingServer:
    """An OpenAI-compatible endpoint that demands the planted key and echoes it back in its errors, as a
    careless server might: the client must still never repeat it."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {SECRET}" or body["messages"][-1]["content"] == "fail":
                    return self._send(400, {"error": f"rejected request with {self.headers.get('Authorization')}"})
                choices = [{"index": 0, "message": {"role": "assistant", "content": "four"}, "finish_reason": "stop"}]
                self._send(200, {"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def _run_generation_asset(store: Store, instance: dg.DagsterInstance, url: str, prompt: str) -> dg.ExecuteInJobResult:
    store.write_jsonl("work/requests.jsonl", [{"request_id": "r1", "messages": [{"role": "user", "content": prompt}]}])
    extras = {"tulu_home": store.url, "requests": "work/requests.jsonl", "output": "work/out.jsonl",
              "backend": BackendSpec(kind="openai", base_url=url, model="served", api_key_env="TULU_PLANTED_KEY",
                                     max_retries=0).model_dump(mode="json"),
              "params": {"max_new_tokens": 4, "temperature": 0, "n": 1, "seed": 0, "stop": []}}

    @dg.asset(required_resource_keys={"launcher"})
    def http_generation(context):  # (no annotations: this module's are strings, which Dagster does not resolve)
        return context.resources.launcher.run(context, "tulu_pipeline.generation.job",
                                              extras=extras).get_materialize_result()

    return dg.materialize([http_generation], instance=instance, resources={"launcher": LocalLauncher()},
                          raise_on_error=False)


@pytest.mark.integration
def test_a_planted_secret_never_reaches_logs_metadata_or_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TULU_PLANTED_KEY", SECRET)  # the only way the key enters: the environment
    server = _KeyCheckingServer()
    store = Store(str(tmp_path / "home"))
    (tmp_path / "dagster").mkdir()
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
            ok = _run_generation_asset(store, instance, server.url, "2+2?")
            assert ok.success  # the key reached the server
            failed = _run_generation_asset(store, instance, server.url, "fail")
            assert not failed.success
            texts = []
            for result in (ok, failed):
                for record in instance.all_logs(result.run_id):
                    texts.append(record.user_message or "")
                    if record.dagster_event is not None:
                        texts.append(repr(record.dagster_event))
            assert any("400" in t for t in texts), "the failure is reported"
            assert not [t for t in texts if SECRET in t]
            captured = [p for p in Path(tmp_path / "dagster").rglob("*") if p.is_file()]  # compute logs, storage
            assert captured and not [p for p in captured if SECRET.encode() in p.read_bytes()]
    finally:
        server.httpd.shutdown()
    files = [p for p in Path(store.root).rglob("*") if p.is_file()]
    assert any(p.name == "out.jsonl" for p in files)
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
