// check_tokenizer.mjs - optional cross-check of fixtures/tokenizer/tokenizer_cases.json
// against Hugging Face's JavaScript tokenizers (an implementation independent of
// tokenizer_ref.py). Not run by make; needs node and the npm package:
//   mkdir -p /tmp/tokcheck && cd /tmp/tokcheck && npm install @huggingface/tokenizers@0.2.0
//   cp /path/to/tests/reference/check_tokenizer.mjs . && node check_tokenizer.mjs /path/to/tests/reference/fixtures/tokenizer
// Checks every case's ids (add_special_tokens false), decoded and decoded_skip_special.
import { Tokenizer } from "@huggingface/tokenizers";
import fs from "fs";
const dir = process.argv[2];
const tj = JSON.parse(fs.readFileSync(dir + "/tokenizer.json", "utf8"));
const tc = JSON.parse(fs.readFileSync(dir + "/tokenizer_config.json", "utf8"));
const cases = JSON.parse(fs.readFileSync(dir + "/tokenizer_cases.json", "utf8")).cases;
const tok = new Tokenizer(tj, tc);
let bad = 0;
for (const c of cases) {
  const enc = tok.encode(c.text, { add_special_tokens: false });
  const ids = Array.from(enc.ids);
  const dec = c.ids.length ? tok.decode(c.ids, { skip_special_tokens: false }) : "";
  const decs = c.ids.length ? tok.decode(c.ids, { skip_special_tokens: true }) : "";
  const ok = JSON.stringify(ids) === JSON.stringify(c.ids);
  if (!ok || dec !== c.decoded || decs !== c.decoded_skip_special) {
    bad++;
    console.log("MISMATCH", JSON.stringify(c.text), "\n js ", JSON.stringify(ids), JSON.stringify(enc.tokens), "\n py ", JSON.stringify(c.ids), JSON.stringify(c.tokens), "\n dec js", JSON.stringify(dec), JSON.stringify(decs), "py", JSON.stringify(c.decoded), JSON.stringify(c.decoded_skip_special));
  }
}
const withbos = tok.encode("Hello world");
console.log("with special:", JSON.stringify(Array.from(withbos.ids)));
console.log(bad === 0 ? "ALL " + cases.length + " CASES MATCH" : bad + " mismatches");
process.exit(bad === 0 ? 0 : 1);
