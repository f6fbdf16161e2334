"""QoS 1 both ways with Paho against lanpush's MQTT listener.

Subscribes to TOPIC_FILTER at QoS 1, prints "subscribed" once SUBACK came back, publishes
OWN_TOPIC at QoS 1 and waits for its PUBACK, then waits until COUNT messages arrived and prints
one JSON line per message ({"topic", "payload", "qos", "retain"}) and a last line
{"puback": true, "granted": [...]}. The test publishes the other messages (with `lanpush pub`)
after reading "subscribed". Usage: paho_qos1.py HOST PORT TOPIC_FILTER OWN_TOPIC COUNT
"""
import json
import queue
import sys

import paho.mqtt.client as mqtt

TIMEOUT_S = 20


def client(client_id):
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    return mqtt.Client(client_id=client_id)


def main():
    host, port, topic_filter, own_topic, count = (
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    events = queue.Queue()
    c = client("paho-qos1")

    def on_connect(*args):
        c.subscribe(topic_filter, qos=1)

    def on_subscribe(client, userdata, mid, granted, *rest):
        codes = [getattr(g, "value", g) for g in granted]
        events.put(("subscribed", codes))

    def on_message(client, userdata, msg):
        events.put(("message", msg))

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    kind, granted = events.get(timeout=TIMEOUT_S)
    assert kind == "subscribed", kind
    print("subscribed", flush=True)
    info = c.publish(own_topic, b"from-paho", qos=1)
    # Returns once PUBACK came back (raises on timeout in paho 2, returns in 1.x).
    info.wait_for_publish(timeout=TIMEOUT_S)
    got = []
    while len(got) < count:
        kind, msg = events.get(timeout=TIMEOUT_S)
        if kind == "message":
            got.append(msg)
    for msg in got:
        print(
            json.dumps(
                {
                    "topic": msg.topic,
                    "payload": msg.payload.decode(),
                    "qos": msg.qos,
                    "retain": bool(msg.retain),
                }
            ),
            flush=True,
        )
    print(json.dumps({"puback": info.is_published(), "granted": granted}), flush=True)
    c.disconnect()
    c.loop_stop()


if __name__ == "__main__":
    main()
