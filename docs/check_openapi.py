#!/usr/bin/python3
"""Checks docs/openapi.yaml against itself and against the server's route table.

    /usr/bin/python3 docs/check_openapi.py        (from the repository root, or anywhere)

Checks: the file is valid YAML (python3-yaml's safe loader) shaped like an OpenAPI 3.0 document;
every $ref points at something that exists; every {param} in a path is declared as a path
parameter; and the (method, path) pairs equal those of api_routes[] in server/api.c, both ways.
Prints each problem and exits 1 if there is any, else prints a summary and exits 0.
"""
import os
import re
import sys

try:
    import yaml
except ImportError:
    sys.exit("check_openapi: python3-yaml is needed (apt-get install python3-yaml)")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def routes_from_api_c(path):
    """The (METHOD, pattern) pairs of the api_routes[] table."""
    text = open(path, encoding="utf-8").read()
    start = text.find("api_routes[] = {")
    if start < 0:
        sys.exit("check_openapi: no api_routes[] table in %s" % path)
    end = text.find("};", start)
    table = text[start:end]
    return set(re.findall(r'\{\s*"([A-Z]+)"\s*,\s*"([^"]+)"', table))


def resolve(doc, ref):
    """The node a local $ref names, or None."""
    if not ref.startswith("#/"):
        return None
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def walk_refs(node, where, out):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                out.append((where, value))
            else:
                walk_refs(value, "%s/%s" % (where, key), out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            walk_refs(value, "%s[%d]" % (where, i), out)


def params_of(doc, items):
    names = set()
    for p in items or []:
        if "$ref" in p:
            p = resolve(doc, p["$ref"]) or {}
        if p.get("in") == "path":
            names.add(p.get("name"))
    return names


def main():
    problems = []
    spec_path = os.path.join(HERE, "openapi.yaml")
    with open(spec_path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)

    if not isinstance(doc, dict):
        sys.exit("check_openapi: openapi.yaml is not a mapping")
    if not str(doc.get("openapi", "")).startswith("3.0"):
        problems.append("openapi: must be 3.0.x, is %r" % doc.get("openapi"))
    for key in ("info", "paths", "components"):
        if key not in doc:
            problems.append("missing top-level %s" % key)
    for key in ("title", "version"):
        if key not in doc.get("info", {}):
            problems.append("info.%s is missing" % key)

    refs = []
    walk_refs(doc, "#", refs)
    for where, ref in refs:
        if resolve(doc, ref) is None:
            problems.append("%s: $ref %s does not resolve" % (where, ref))

    documented = set()
    for path, item in doc.get("paths", {}).items():
        declared = params_of(doc, item.get("parameters"))
        for method, op in item.items():
            if method not in METHODS:
                continue
            documented.add((method.upper(), path))
            names = declared | params_of(doc, op.get("parameters"))
            for name in re.findall(r"\{([^}]+)\}", path):
                if name not in names:
                    problems.append("%s %s: path parameter {%s} not declared"
                                    % (method.upper(), path, name))
            if not op.get("responses"):
                problems.append("%s %s: no responses" % (method.upper(), path))
            for code in op.get("responses", {}):
                if not re.fullmatch(r"[1-5]\d\d|default", str(code)):
                    problems.append("%s %s: bad response code %r" % (method.upper(), path, code))

    served = routes_from_api_c(os.path.join(REPO, "server", "api.c"))
    for method, path in sorted(served - documented):
        problems.append("served but not in openapi.yaml: %s %s" % (method, path))
    for method, path in sorted(documented - served):
        problems.append("in openapi.yaml but not served: %s %s" % (method, path))

    for p in problems:
        print("check_openapi: " + p)
    if problems:
        return 1
    print("check_openapi: ok (%d operations match server/api.c, %d $refs resolve)"
          % (len(documented), len(refs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
