"""The bare endpoint: the limit of the HTTP server stack the services run on. A FastAPI app with
one trivial `POST /v1/calls` that reads the body and answers 202, served by uvicorn exactly as a
service serves (`postback run` runs `uvicorn.Server.serve` on the same event loop with the same
config), in a process of its own.

    python -m bench.bare --port 8099
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from postback_libs.runtime import run_event_loop

app = FastAPI(title="bare")


@app.post("/v1/calls", status_code=202)
async def accept(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"request_id": "req_bare", "status": "accepted"}, 202)


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_config=None, access_log=False
    )
    run_event_loop(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
