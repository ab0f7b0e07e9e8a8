// The API's own description (GET /openapi.json, public, no key): every form's bounds, defaults, choices and help
// text come from it, so that the page offers what the API accepts and no number is written twice.

let spec = null;

/** The API's OpenAPI description, fetched once per page. */
export function openapi() {
  if (!spec) {
    spec = fetch("/openapi.json", {credentials: "omit"}).then((response) => {
      if (!response.ok) throw new Error(`the API's schema (/openapi.json) answered ${response.status}`);
      return response.json();
    });
  }
  return spec;
}

/** A JSON pointer ("#/components/schemas/JobCreate") into the description. */
function pointed(doc, ref) {
  if (!ref.startsWith("#/")) return {};
  return ref.slice(2).split("/").map((part) => decodeURIComponent(part).replace(/~1/g, "/").replace(/~0/g, "~"))
    .reduce((node, part) => node?.[part], doc) || {};
}

/** A schema with its $ref followed and its allOf merged into one object (properties and required joined). */
function resolved(doc, node, seen = new Set()) {
  if (!node || typeof node !== "object") return {};
  if (node.$ref) {
    if (seen.has(node.$ref)) return {};
    const {$ref, ...rest} = node;
    return resolved(doc, {...pointed(doc, $ref), ...rest}, new Set(seen).add($ref));
  }
  if (node.allOf) {
    const {allOf, ...rest} = node;
    return [...allOf.map((part) => resolved(doc, part, seen)), rest].reduce((out, part) => ({
      ...out, ...part,
      properties: {...out.properties, ...part.properties},
      required: [...(out.required || []), ...(part.required || [])],
    }), {});
  }
  return node;
}

/** The alternatives of a union (oneOf, anyOf, nested ones flattened), each resolved; a plain schema is its own one. */
function alternatives(doc, node) {
  const schema = resolved(doc, node);
  const union = schema.oneOf || schema.anyOf;
  return union ? union.flatMap((part) => alternatives(doc, part)) : [schema];
}

/** Whether a property's schema accepts the value (its const, or one of its enum, in any of its alternatives). */
function accepts(doc, prop, value) {
  return alternatives(doc, prop).some((p) => p.const === value || (Array.isArray(p.enum) && p.enum.includes(value)));
}

/**
 * The request body of POST /jobs for a mode ("single_image", "category", "full" or "evaluate"): the alternative of
 * the body's union whose `mode` accepts it (its const or enum), whatever its component is called. Resolves to its
 * properties by name, each as `field` describes it; rejects when the API describes no such body.
 */
export async function jobBody(mode) {
  const doc = await openapi();
  const body = doc.paths?.["/jobs"]?.post?.requestBody?.content?.["application/json"]?.schema;
  const candidates = [
    ...(body ? alternatives(doc, body) : []),
    ...Object.values(doc.components?.schemas || {}).map((schema) => resolved(doc, schema)), // in case the body moved
  ];
  const found = candidates.find((schema) => schema.properties?.mode && accepts(doc, schema.properties.mode, mode));
  if (!found) throw new Error(`the API's schema describes no job body with mode "${mode}"`);
  return Object.fromEntries(Object.entries(found.properties).map(([name, prop]) => [name, field(doc, prop)]));
}

/**
 * The request body of POST /sweeps, as a form needs it: `grid`, the names of the fields a grid may vary (its
 * propertyNames' enum, or its properties' names where the grid is an object of named lists), and `metric`, the
 * ranking metric's property (see `field`). Rejects when the API describes no sweeps.
 */
export async function sweepBody() {
  const doc = await openapi();
  const body = doc.paths?.["/sweeps"]?.post?.requestBody?.content?.["application/json"]?.schema;
  if (!body) throw new Error("the API's schema describes no POST /sweeps");
  const properties = resolved(doc, body).properties || {};
  const grid = alternatives(doc, properties.grid).find((p) => p.type !== "null") || {};
  const names = resolved(doc, grid.propertyNames || {}).enum ?? Object.keys(grid.properties || {});
  if (!names.length) throw new Error("the API's schema names no field a sweep's grid may vary");
  return {grid: names, metric: properties.metric ? field(doc, properties.metric) : null};
}

/**
 * What a form needs of one property: kind ("int", "float", "enum", "bool" or "text"), choices (an enum's values),
 * min and max (inclusive bounds), maxLength, default and description. An optional property (anyOf with null) is
 * described by its other alternative.
 */
function field(doc, node) {
  const outer = resolved(doc, node);
  const parts = alternatives(doc, outer).filter((p) => p.type !== "null");
  const prop = parts.length === 1 && parts[0] !== outer ? {...parts[0], ...withoutUnion(outer)} : outer;
  const choices = prop.enum ?? (prop.const !== undefined ? [prop.const] : null);
  const kind = choices ? "enum"
    : prop.type === "boolean" ? "bool"
    : prop.type === "integer" ? "int"
    : prop.type === "number" ? "float"
    : "text";
  return {
    kind, choices,
    min: prop.minimum ?? null, max: prop.maximum ?? null, maxLength: prop.maxLength ?? null,
    default: prop.default ?? null, description: prop.description || "",
  };
}

function withoutUnion({anyOf, oneOf, ...rest}) {
  return rest;
}
