"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const { client, unique, addr } = require("./helpers");

test("status: leader and peers", async () => {
  const consul = client();
  assert.equal(await consul.status.leader(), addr);
  assert.deepEqual(await consul.status.peers(), [addr]);
});

test("kv: set, get and check-and-set", async () => {
  const consul = client();
  const key = unique("node-kv");
  assert.equal(await consul.kv.set(key, "one"), true);
  const entry = await consul.kv.get(key);
  assert.equal(entry.Value, "one");
  // a stale cas answers `false` (the package hands a JSON false back as undefined)
  assert.ok(!(await consul.kv.set({ key, value: "two", cas: entry.ModifyIndex + 1000 })));
  assert.equal((await consul.kv.get(key)).Value, "one");
  assert.equal(await consul.kv.set({ key, value: "two", cas: entry.ModifyIndex }), true);
  assert.equal((await consul.kv.get(key)).Value, "two");
});

test("catalog and health with a filter", async () => {
  const consul = client();
  const svc = unique("node-svc");
  for (const [i, status] of [["1", "passing"], ["2", "critical"]]) {
    await consul.catalog.register({
      node: `${svc}-n${i}`,
      address: `10.3.0.${i}`,
      service: { service: svc, id: `${svc}-${i}`, port: 80, tags: [`v${i}`] },
      check: { checkid: `${svc}-c${i}`, name: "up", status, serviceid: `${svc}-${i}` },
    });
  }
  const all = await consul.health.service(svc);
  assert.equal(all.length, 2);
  const passing = await consul.health.service({ service: svc, passing: true });
  assert.deepEqual(passing.map((e) => e.Service.ID), [`${svc}-1`]);
  const filtered = await consul.health.service({ service: svc, filter: 'Service.Tags contains "v2"' });
  assert.deepEqual(filtered.map((e) => e.Service.ID), [`${svc}-2`]);
});

test("sessions lock keys", async () => {
  const consul = client();
  const key = unique("node-lock");
  const { ID: session } = await consul.session.create({ ttl: "60s" });
  assert.equal(await consul.kv.set({ key, value: "held", acquire: session }), true);
  assert.equal((await consul.kv.get(key)).Session, session);
  await consul.session.destroy(session);
});
