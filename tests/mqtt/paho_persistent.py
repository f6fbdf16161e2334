"""A persistent Paho session (clean session 0) against lanpush's MQTT listener.

`subscribe`: connects, subscribes to TOPIC_FILTER at QoS 1, prints "subscribed", disconnects.
`resume`: connects with the same client id, prints {"session_present": ...}, then one JSON line
per message ({"topic", "payload", "qos"}) until COUNT arrived, then disconnects.
Usage: paho_persistent.py subscribe|resume HOST PORT CLIENT_ID TOPIC_FILTER COUNT
"""
import json
import queue
import sys

import paho.mqtt.client as mqtt

TIMEOUT_S = 20


def client(client_id):
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
    return mqtt.Client(client_id=client_id, clean_session=False)


def main():
    mode, host, port, client_id, topic_filter, count = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        sys.argv[4],
        sys.argv[5],
        int(sys.argv[6]),
    )
    events = queue.Queue()
    c = client(client_id)

    def on_connect(client, userdata, flags, *rest):
        present = getattr(flags, "session_present", None)
        if present is None:
            present = flags.get("session present", 0)
        events.put(("connected", bool(present)))

    c.on_connect = on_connect
    c.on_subscribe = lambda *args: events.put(("subscribed", None))
    c.on_message = lambda client, userdata, msg: events.put(("message", msg))
    c.connect(host, port, keepalive=30)
    c.loop_start()
    kind, present = events.get(timeout=TIMEOUT_S)
    assert kind == "connected", kind
    if mode == "subscribe":
        c.subscribe(topic_filter, qos=1)
        kind, _ = events.get(timeout=TIMEOUT_S)
        assert kind == "subscribed", kind
        print("subscribed", flush=True)
    else:
        print(json.dumps({"session_present": present}), flush=True)
        got = 0
        while got < count:
            kind, msg = events.get(timeout=TIMEOUT_S)
            if kind == "message":
                got += 1
                print(
                    json.dumps(
                        {"topic": msg.topic, "payload": msg.payload.decode(), "qos": msg.qos}
                    ),
                    flush=True,
                )
    c.disconnect()
    c.loop_stop()


if __name__ == "__main__":
    main()
