"""A Paho MQTT client with a will: connects, prints "connected", then waits to be killed.

Run by tests/mqtt_interop.rs, which kills it (SIGKILL, no DISCONNECT) and expects the engine to
publish the will. Usage: paho_will.py HOST PORT WILL_TOPIC WILL_MESSAGE
"""
import sys
import time

import paho.mqtt.client as mqtt


def client(client_id):
    # paho-mqtt 2.x asks for a callback API version; 1.x has no such argument.
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    return mqtt.Client(client_id=client_id)


def main():
    host, port, topic, message = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    c = client("paho-will")
    c.will_set(topic, message, qos=0, retain=False)
    c.on_connect = lambda *args: print("connected", flush=True)
    c.connect(host, port, keepalive=30)
    c.loop_start()
    # Killed by the test; the deadline only ends an orphan.
    time.sleep(60)


if __name__ == "__main__":
    main()
