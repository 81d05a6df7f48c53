"""HTTP front of the simulator: the Vast API paths the vastai 1.9.1 SDK calls, plus /_sim/ controls.

Authentication is ``Authorization: Bearer <key>``. An unknown key gets 401
``invalid_api_key`` (the ``bad_key_status`` fault switches it to 404, which
Vast also does). An instance-scoped key (``CONTAINER_API_KEY`` inside an
instance) may only show or destroy its own instance; anything else is 403.
Errors are Vast's ``{"success": false, "error": ..., "msg": ...}`` bodies, so
the SDK's ``raise_for_status()`` raises ``requests.HTTPError``.

Control endpoints (account key required):

    GET    /_sim/state                          offers, faults, instances, charges
    POST   /_sim/faults                         {"offer_id"?: N, <fault>: value, ...}
    DELETE /_sim/faults                         clear every fault
    POST   /_sim/instances/{id}/preempt         -> exited, processes killed
    POST   /_sim/instances/{id}/offline         -> offline, processes killed
    POST   /_sim/instances/{id}/host_key        new host key, sshd restarted on the same port
    POST   /_sim/instances/{id}/gpu             {"gpu"?: index, "temperature": 92, ...}
    POST   /_sim/instances/{id}/traffic         {"up_bytes": N, "down_bytes": N}, billed as bandwidth
    POST   /_sim/offers/{id}/demand             {"on_demand": N, "bids": [$/h, ...]}: other renters (bid market)
    POST   /_sim/offers                         add an offer (config dict)
    DELETE /_sim/offers/{id}                    remove an offer
    GET    /_sim/results/{token}                log text behind a request_logs result_url (no auth)
"""

from __future__ import annotations

import json
import logging
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from .simulator import SimError, Simulator

ROUTES = []


def route(method: str, pattern: str, scoped: bool = False, auth: bool = True):
    """Register a handler; ``scoped`` lets an instance-scoped key call it for its own instance."""
    def register(handler):
        ROUTES.append((method, re.compile("^" + pattern + "/?$"), handler, scoped, auth))
        return handler
    return register


def ok(**extra) -> dict:
    return {"success": True, **extra}


# ---- offers and instances ---------------------------------------------------

@route("POST", r"/api/v0/bundles")
def search_offers(sim: Simulator, req):
    return {"offers": sim.search_offers(req.body)}


@route("PUT", r"/api/v0/search/asks")
def search_offers_new(sim: Simulator, req):
    return {"offers": sim.search_offers(req.body.get("q") or {})}


@route("PUT", r"/api/v0/asks/(\d+)")
def create_instance(sim: Simulator, req, offer_id):
    return ok(new_contract=sim.create_instance(int(offer_id), req.body))


@route("GET", r"/api/v1/instances")
def list_instances_v1(sim: Simulator, req):
    rows = sim.list_instances(req.query.get("select_filters"), req.query.get("order_by"))
    offset = int(req.query.get("after_token") or 0)
    limit = int(req.query.get("limit") or 25)
    page = rows[offset:offset + limit]
    more = offset + limit < len(rows)
    return {"instances": page, "next_token": str(offset + limit) if more else None,
            "total_instances": len(rows)}


@route("GET", r"/api/v0/instances")
def list_instances_v0(sim: Simulator, req):
    return {"instances": sim.list_instances()}


@route("GET", r"/api/v0/instances/(\d+)", scoped=True)
def show_instance(sim: Simulator, req, instance_id):
    return {"instances": sim.show_instance(int(instance_id))}


@route("PUT", r"/api/v0/instances/(\d+)")
def update_instance(sim: Simulator, req, instance_id):
    sim.update_instance(int(instance_id), req.body)
    return ok()


@route("PUT", r"/api/v0/instances")
def update_instances(sim: Simulator, req):
    for instance_id in req.body.get("ids") or []:
        sim.update_instance(int(instance_id), {"state": req.body.get("state")})
    return ok()


@route("PUT", r"/api/v0/instances/bid_price/(\d+)")
def change_bid(sim: Simulator, req, instance_id):
    sim.change_bid(int(instance_id), req.body.get("price"))
    return ok()


@route("PUT", r"/api/v0/instances/reboot/(\d+)")
def reboot_instance(sim: Simulator, req, instance_id):
    sim.reboot_instance(int(instance_id))
    return ok()


@route("DELETE", r"/api/v0/instances/(\d+)", scoped=True)
def destroy_instance(sim: Simulator, req, instance_id):
    sim.destroy_instance(int(instance_id))
    return ok()


@route("DELETE", r"/api/v0/instances")
def destroy_instances(sim: Simulator, req):
    for instance_id in req.body.get("instance_ids") or []:
        sim.destroy_instance(int(instance_id))
    return ok()


@route("PUT", r"/api/v0/instances/request_logs/(\d+)")
def request_logs(sim: Simulator, req, instance_id):
    token = sim.request_logs(int(instance_id), req.body.get("tail"))
    return ok(result_url=f"{sim.url}/_sim/results/{token}")


# ---- keys ---------------------------------------------------------------------

@route("POST", r"/api/v0/instances/(\d+)/ssh")
def attach_ssh_key(sim: Simulator, req, instance_id):
    added = sim.attach_ssh_key(int(instance_id), req.body.get("ssh_key"))
    return ok(msg="SSH key added to instance." if added else "SSH key already on instance.")


@route("GET", r"/api/v0/ssh")
def show_ssh_keys(sim: Simulator, req):
    return sim.account_ssh_keys()


@route("POST", r"/api/v0/ssh")
def create_ssh_key(sim: Simulator, req):
    entry = sim.add_account_ssh_key(req.body.get("ssh_key"))
    return ok(id=entry["id"], key=entry)


@route("DELETE", r"/api/v0/ssh/(\d+)")
def delete_ssh_key(sim: Simulator, req, key_id):
    sim.delete_account_ssh_key(int(key_id))
    return ok()


# ---- account and billing -------------------------------------------------------

@route("GET", r"/api/v0/users/current")
def show_user(sim: Simulator, req):
    return sim.user()


@route("GET", r"/api/v0/charges")
def show_charges(sim: Simulator, req):
    q = req.query
    return sim.charges(q.get("select_filters") or {}, bool(q.get("latest_first")),
                       int(q.get("limit") or 20), q.get("after_token"))


@route("GET", r"/api/v0/users/me/invoices")
def show_invoices_legacy(sim: Simulator, req):
    return sim.legacy_invoices(float(req.query.get("sdate") or 0), float(req.query.get("edate") or time.time()))


@route("GET", r"/api/v1/invoices")
def show_invoices_v1(sim: Simulator, req):
    credit = {"id": 1, "type": "credit", "source": "vastsim", "description": "vastsim starting credit",
              "amount": sim.initial_credit, "start": sim.started_at, "end": sim.started_at, "items": [],
              "metadata": {"invoice_id": 1}}
    return {"results": [credit], "count": 1, "total": 1, "next_token": None}


# ---- simulator controls ------------------------------------------------------

@route("GET", r"/_sim/state")
def sim_state(sim: Simulator, req):
    return sim.state()


@route("POST", r"/_sim/faults")
def sim_set_faults(sim: Simulator, req):
    changes = dict(req.body)
    offer_id = changes.pop("offer_id", None)
    try:
        return ok(faults=sim.set_faults(offer_id, **changes))
    except ValueError as err:
        raise SimError(400, "invalid_args", str(err)) from err


@route("DELETE", r"/_sim/faults")
def sim_clear_faults(sim: Simulator, req):
    sim.clear_faults()
    return ok()


@route("POST", r"/_sim/instances/(\d+)/(preempt|offline|host_key|gpu)")
def sim_instance_action(sim: Simulator, req, instance_id, action):
    instance_id = int(instance_id)
    if action == "gpu":
        values = dict(req.body)
        return ok(gpus=sim.set_gpu(instance_id, values.pop("gpu", None), **values))
    {"preempt": sim.preempt, "offline": sim.go_offline, "host_key": sim.change_host_key}[action](instance_id)
    return ok()


@route("POST", r"/_sim/instances/(\d+)/traffic")
def sim_add_traffic(sim: Simulator, req, instance_id):
    sim.add_traffic(int(instance_id), float(req.body.get("up_bytes") or 0), float(req.body.get("down_bytes") or 0))
    return ok()


@route("POST", r"/_sim/offers/(\d+)/demand")
def sim_offer_demand(sim: Simulator, req, offer_id):
    sim.compete(int(offer_id), int(req.body.get("on_demand") or 0), req.body.get("bids") or [])
    return ok()


@route("POST", r"/_sim/offers")
def sim_add_offer(sim: Simulator, req):
    try:
        return ok(offer=sim.add_offer(req.body))
    except ValueError as err:
        raise SimError(400, "invalid_args", str(err)) from err


@route("DELETE", r"/_sim/offers/(\d+)")
def sim_remove_offer(sim: Simulator, req, offer_id):
    sim.remove_offer(int(offer_id))
    return ok()


@route("GET", r"/_sim/results/(\w+)", auth=False)
def sim_result(sim: Simulator, req, token):
    text = sim.result(token)
    if text is None:
        raise SimError(404, "not_found", "No such result.")
    return text


# ---- HTTP plumbing -------------------------------------------------------------

def _query_value(raw: str):
    """The SDK JSON-encodes non-string query values (dicts, lists, numbers)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class Request:
    def __init__(self, body, query):
        self.body, self.query = body, query


class SimHandler(BaseHTTPRequestHandler):
    server_version = "vastsim/1.0"
    protocol_version = "HTTP/1.0"  # one request per connection

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):  # request lines only: never headers (they hold the key)
        self.server.sim.log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        sim: Simulator = self.server.sim
        parts = urlsplit(self.path)
        if parts.path.startswith("/api/") and sim.api_down():
            self.close_connection = True          # no answer at all: the client sees the connection dropped
            sim.log.info("%s %s -> dropped (api_down_s)", method, parts.path)
            return
        try:
            body = self._read_body()
            handler, args, scoped, needs_auth = self._find_route(method, parts.path)
            limited, retry_after = sim.take_rate_limit() if parts.path.startswith("/api/") else (False, None)
            if limited:
                headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
                raise SimError(429, "rate_limit_exceeded", "API requests too frequent.", headers)
            if needs_auth:
                self._authorize(sim, scoped, args)
            query = {k: _query_value(v) for k, v in parse_qsl(parts.query, keep_blank_values=True)}
            result = handler(sim, Request(body, query), *args)
            self._send(200, result)
        except SimError as err:
            self._send(err.status, {"success": False, "error": err.error, "msg": err.msg}, err.headers)
        except Exception as err:  # a simulator bug: answer 500 and log it, keep serving
            sim.log.exception("error handling %s %s", method, parts.path)
            self._send(500, {"success": False, "error": "server_error", "msg": f"{type(err).__name__}: {err}"})
        level = logging.DEBUG if method == "GET" and self._status == 200 else logging.INFO
        sim.log.log(level, "%s %s -> %s", method, parts.path, self._status)

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise SimError(400, "invalid_json", f"request body is not JSON: {err}") from err
        return body if isinstance(body, dict) else {"_": body}

    def _find_route(self, method: str, path: str):
        path_known = False
        for route_method, pattern, handler, scoped, needs_auth in ROUTES:
            match = pattern.match(path)
            if match:
                path_known = True
                if route_method == method:
                    return handler, match.groups(), scoped, needs_auth
        if path_known:
            raise SimError(405, "method_not_allowed", f"{method} not allowed on {path}")
        raise SimError(404, "not_found", f"vastsim does not implement {method} {path}")

    def _authorize(self, sim: Simulator, scoped: bool, args) -> None:
        header = self.headers.get("Authorization") or ""
        key = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
        who = sim.principal(key)
        if who == "account":
            return
        if who is None:
            status = sim.faults.requests.bad_key_status
            raise SimError(status, "invalid_api_key", "Invalid or missing API key.")
        _, instance_id = who
        if not (scoped and args and int(args[0]) == instance_id):
            raise SimError(403, "permission_denied",
                           f"This key is scoped to instance {instance_id}; it can only show or destroy it.")

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        self._status = status
        if isinstance(payload, str):
            data, content_type = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client went away (e.g. an instance that destroyed itself)
            pass


class SimHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sim: Simulator, address):
        self.sim = sim
        super().__init__(address, SimHandler)


def make_server(sim: Simulator, host: str, port: int) -> SimHTTPServer:
    return SimHTTPServer(sim, (host, port))
