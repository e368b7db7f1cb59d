"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const { client, unique, b64 } = require("./helpers");

test("transaction: all operations under one index", async () => {
  const consul = client();
  const key = unique("node-txn");
  const result = await consul.transaction.create([
    { KV: { Verb: "set", Key: `${key}/a`, Value: b64("1") } },
    { KV: { Verb: "set", Key: `${key}/b`, Value: b64("2") } },
    { KV: { Verb: "get", Key: `${key}/a` } },
  ]);
  assert.equal(result.Errors, null);
  assert.equal(result.Results.length, 3);
  const indexes = new Set(result.Results.map((r) => r.KV.ModifyIndex));
  assert.equal(indexes.size, 1);
  assert.equal(Buffer.from(result.Results[2].KV.Value, "base64").toString(), "1");
});

test("transaction: a failed operation applies nothing and answers 409 with Errors", async () => {
  const consul = client();
  const key = unique("node-txn");
  await assert.rejects(
    consul.transaction.create([
      { KV: { Verb: "set", Key: `${key}/new`, Value: b64("x") } },
      { KV: { Verb: "cas", Key: `${key}/old`, Value: b64("y"), Index: 999999 } },
    ]),
    (err) => {
      assert.equal(err.statusCode, 409);
      const body = err.response.body;
      assert.equal(body.Results, null);
      assert.equal(body.Errors[0].OpIndex, 1);
      assert.match(body.Errors[0].What, /index is stale/);
      return true;
    },
  );
  assert.equal(await consul.kv.get(`${key}/new`), undefined);
});

test("transaction: over the operation limit is refused", async () => {
  const consul = client();
  const key = unique("node-txn");
  const ops = [];
  for (let i = 0; i < 129; i += 1) ops.push({ KV: { Verb: "set", Key: `${key}/${i}`, Value: b64("v") } });
  await assert.rejects(consul.transaction.create(ops), (err) => err.statusCode === 413);
});
