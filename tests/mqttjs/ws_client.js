// mqtt.js (npm package `mqtt`, no one here wrote it) over WebSocket subprotocol `mqtt`, as a
// browser HMI would connect. Driven by tests/mqttjs.rs: prints one line per step on stdout.
//   node ws_client.js ws://127.0.0.1:PORT/mqtt
"use strict";
const mqtt = require("mqtt");

const url = process.argv[2];
const client = mqtt.connect(url, {
  protocolVersion: 4,
  clientId: "mqttjs-ws-1",
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 10000,
});
const deadline = setTimeout(() => {
  console.log("timeout");
  process.exit(2);
}, 20000);

client.on("connect", () => {
  console.log("connected");
  client.subscribe({ "plant/#": { qos: 1 } }, (err, granted) => {
    if (err) { console.log("suback error " + err.message); process.exit(3); }
    console.log("subscribed " + granted.map((g) => g.topic + ":" + g.qos).join(","));
    client.publish("hmi/from-mqttjs", "hello from mqtt.js", { qos: 1 }, (err) => {
      if (err) { console.log("publish error " + err.message); process.exit(4); }
      console.log("published");
    });
  });
});
client.on("message", (topic, payload, packet) => {
  console.log("message " + topic + " " + payload.toString() + " retain=" + packet.retain);
  if (topic === "plant/line1/temp" && payload.toString() === "21.5") {
    clearTimeout(deadline);
    client.end(false, () => { console.log("closed"); process.exit(0); });
  }
});
client.on("error", (err) => { console.log("error " + err.message); process.exit(5); });
