"""An existing Twisted web app that embeds pubsub beside its own pages.

Run it with the project's venv:

    .venv/bin/python docs/examples/embedded.py --port 8080

then open ws://127.0.0.1:8080/pubsub and SUBSCRIBE to "ticks": the app publishes
the time there every second from its own code. http://127.0.0.1:8080/hello is
one of the app's ordinary pages; POST /announce publishes its request body to
the "announcements" channel and answers with the receiver count.
"""

import argparse
import sys
import time

from twisted.internet import reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.python import log
from twisted.web.resource import Resource
from twisted.web.server import Site

import pubsub


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello from the app\n"


class Announce(Resource):
    """Publishing from application code: a plain call, returning the receiver count."""

    isLeaf = True

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def render_POST(self, request):
        receivers = self.engine.publish("announcements", request.content.read())
        return b"%d\n" % receivers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    log.startLogging(sys.stdout)

    engine = pubsub.Engine()
    root = Resource()
    root.putChild(b"hello", Hello())
    root.putChild(b"announce", Announce(engine))
    root.putChild(b"pubsub", pubsub.build_resource(engine, pubsub.Settings(max_message_size=65536)))

    ticker = task.LoopingCall(lambda: engine.publish("ticks", time.strftime("%H:%M:%S")))
    ticker.start(1.0)

    endpoint = serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1")

    def listening(port):
        print(f"embedded app on http://127.0.0.1:{port.getHost().port}/", flush=True)

    endpoint.listen(Site(root)).addCallback(listening)
    reactor.run()


if __name__ == "__main__":
    main()
