"""The two other parties of the README's quickstart, on one port: an API owner and a consumer's
webhook receiver.

    python examples/quickstart_peer.py --port 9000 --webhook-secret whsec_...

POST /report  the owner: answers each call Postback forwards at once, with its result (a 2xx
              with a body is the result; an owner that needs longer answers 202 and posts the
              result to the `X-Postback-Callback-Url` it was given).
POST /hook    the consumer: verifies the Standard Webhooks signature with the consumer's
              webhook secret, prints the message, and answers 204. Anything but a 2xx is
              retried.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def peer(webhook_secret: str) -> web.Application:
    webhooks = Webhook(webhook_secret)

    async def report(request: web.Request) -> web.Response:
        params = json.loads(await request.read() or b"{}")
        title = f"{params.get('action', 'summary')} report"
        return web.json_response({"report": {"title": title, "pages": 12}})

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            message = webhooks.verify(body, dict(request.headers))
        except WebhookVerificationError as e:
            print(f"refused a webhook: {e}", flush=True)
            return web.Response(status=401)
        print(f"webhook {request.headers['webhook-id']}, signature verified:", flush=True)
        print(json.dumps(message, indent=2), flush=True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/report", report)
    app.router.add_post("/hook", hook)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--webhook-secret", required=True, help="the consumer's (whsec_...)")
    args = parser.parse_args()
    web.run_app(peer(args.webhook_secret), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
