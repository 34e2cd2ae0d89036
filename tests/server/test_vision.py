"""Images over HTTP on a real server (the tiny random Llava-Next): TGI's markdown images in
`inputs` and OpenAI's image_url content parts, from data URLs and from a local HTTP server,
answer what transformers answers for the same image; every refusal is a 422 in TGI's format."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time

import httpx
import pytest
import torch
from genserve.multimodal.testing import data_url, png_bytes, random_image

NEW = 8
IMAGE = random_image(70, 40, seed=21)  # 2800 pixels, ~8.5 kB: inside the server's limits
OTHER = random_image(40, 70, seed=22)


@pytest.fixture(scope="module")
def reference(vision_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(vision_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(vision_dir)
    eos = processor.tokenizer.eos_token_id

    def greedy(text: str, images: list) -> list[int]:
        out = processor(text=[text], images=images or None, return_tensors="pt")
        with torch.inference_mode():
            g = model.generate(**out, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        ids = g[0, out["input_ids"].shape[1]:].tolist()
        return ids[:ids.index(eos) + 1] if eos in ids else ids

    def chat_text(ids: list[int]) -> str:
        return processor.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)

    greedy.chat_text = chat_text
    greedy.render = lambda content: processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return greedy


class Images(http.server.BaseHTTPRequestHandler):
    """A local image host: /a.png, /b.png, a large one, a slow one, redirects, a 404."""

    def do_GET(self):
        routes = {"/a.png": png_bytes(IMAGE), "/b.png": png_bytes(OTHER),
                  "/large.png": png_bytes(random_image(200, 200, seed=23))}
        if self.path in routes:
            body = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/slow.png":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd" if self.path == "/redirect-file" else "/a.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture()
def vision(vision_server):
    with httpx.Client(base_url=vision_server.url, timeout=60) as client:
        yield client


def generate(client, inputs: str, **params) -> httpx.Response:
    return client.post("/generate", json={"inputs": inputs, "parameters": {
        "max_new_tokens": NEW, "details": True, **params}})


def token_ids(resp: httpx.Response) -> list[int]:
    assert resp.status_code == 200, resp.text
    return [t["id"] for t in resp.json()["details"]["tokens"]]


def chat(client, content, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "model": "tgi", "max_tokens": NEW, "temperature": 0,
        "messages": [{"role": "user", "content": content}], **extra})


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def assert_refused(resp: httpx.Response, *fragments: str) -> None:
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error_type"] == "validation", body
    for fragment in fragments:
        assert fragment in body["error"], body


# -- answers ---------------------------------------------------------------------------------

def test_markdown_data_url_matches_transformers(vision, reference):
    got = token_ids(generate(vision, f"![]({data_url(IMAGE)})Describe this image."))
    assert got == reference("<image>Describe this image.", [IMAGE])


def test_markdown_http_url_matches_the_data_url(vision, reference, host):
    want = reference("Look: <image> and <image>?", [IMAGE, OTHER])
    got = token_ids(generate(vision, f"Look: ![]({host}/a.png) and ![an alt]({host}/b.png)?"))
    assert got == want
    # Redirects to http(s) are followed.
    assert token_ids(generate(vision, f"Look: ![]({host}/redirect-ok) and ![]({data_url(OTHER)})?")) == want


def test_markdown_image_counts_against_the_stream_route_too(vision, reference):
    with vision.stream("POST", "/generate_stream", json={
            "inputs": f"![]({data_url(IMAGE)})Describe this image.",
            "parameters": {"max_new_tokens": NEW}}) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data:")]
    import json
    ids = [json.loads(e[5:])["token"]["id"] for e in events]
    assert ids == reference("<image>Describe this image.", [IMAGE])


@pytest.mark.parametrize("source", ["data", "http"])
def test_chat_image_url_matches_transformers(vision, reference, host, source):
    url = data_url(IMAGE) if source == "data" else f"{host}/a.png"
    resp = chat(vision, [{"type": "text", "text": "Describe this image."}, image_part(url)])
    assert resp.status_code == 200, resp.text
    text = reference.render([{"type": "image"}, {"type": "text", "text": "Describe this image."}])
    want = reference(text, [IMAGE])
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == reference.chat_text(want)
    assert body["usage"]["completion_tokens"] == len(want)


def test_openai_client_sends_an_image(vision_server, reference):
    from openai import OpenAI

    client = OpenAI(base_url=vision_server.url + "/v1", api_key="-")
    reply = client.chat.completions.create(model="tgi", max_tokens=NEW, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                     {"type": "text", "text": "Describe this image."}]}])
    text = reference.render([{"type": "image"}, {"type": "text", "text": "Describe this image."}])
    assert reply.choices[0].message.content == reference.chat_text(reference(text, [IMAGE]))


def test_text_only_requests_still_work_on_a_vision_model(vision, reference):
    assert token_ids(generate(vision, "Describe this image.")) == reference("Describe this image.", [])
    assert chat(vision, "Hello").status_code == 200


# -- refusals --------------------------------------------------------------------------------

def test_image_to_a_text_only_model(tiny):
    resp = tiny.post("/v1/chat/completions", json={"model": "tgi", "max_tokens": 2, "messages": [
        {"role": "user", "content": [image_part(data_url(IMAGE)), {"type": "text", "text": "Hi"}]}]})
    assert_refused(resp, "text-only")


def test_markdown_on_a_text_only_model_is_text_as_in_tgi(tiny):
    resp = tiny.post("/generate", json={"inputs": "![](https://example.invalid/a.png) hi",
                                        "parameters": {"max_new_tokens": 2}})
    assert resp.status_code == 200, resp.text  # TGI leaves markdown in a text-only prompt as text


def test_too_many_images(vision):
    url = data_url(IMAGE)
    assert_refused(generate(vision, f"![]({url})![]({url})![]({url})"), "too many images", "limit 2")
    assert_refused(chat(vision, [image_part(url)] * 3), "too many images")


def test_image_too_large_in_bytes(vision, host):
    big = random_image(200, 200, seed=23)  # ~120 kB of noise (--max-image-bytes 60000)
    assert_refused(generate(vision, f"![]({data_url(big)})"), "too large", "60000")
    assert_refused(generate(vision, f"![]({host}/large.png)"), "too large")


def test_image_too_large_in_pixels(vision):
    tall = random_image(120, 100, seed=24)  # 12000 pixels (--max-image-pixels 10000), ~36 kB
    assert_refused(chat(vision, [image_part(data_url(tall))]), "too many pixels", "120x100")


def test_image_tokens_count_against_max_input_tokens(vision):
    """Two 56x56 images are 64 image tokens: with a dozen text tokens the prompt passes
    --max-input-tokens 70 although its text alone is far below it."""
    square = data_url(random_image(56, 56, seed=25))
    text = "Describe this image. The quick brown fox jumps over the lazy dog."
    assert generate(vision, f"![]({square}){text}", max_new_tokens=1).status_code == 200
    assert_refused(generate(vision, f"![]({square})![]({square}){text}"), "must have less than 70 tokens")


@pytest.mark.parametrize("url, fragment", [
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "cannot decode"),
    ("data:image/png;base64,@@@notbase64", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "is not an image"),
    ("data:image/png,", "cannot decode"),
], ids=["garbage", "bad-base64", "not-image-mime", "empty"])
def test_undecodable_images(vision, url, fragment):
    assert_refused(chat(vision, [image_part(url)]), fragment)


def test_image_detail_other_than_auto_is_refused(vision, reference):
    part = image_part(data_url(IMAGE))
    part["image_url"]["detail"] = "high"
    assert_refused(chat(vision, [part, {"type": "text", "text": "Hi"}]), "detail", "not supported")
    part["image_url"]["detail"] = "auto"
    assert chat(vision, [part, {"type": "text", "text": "Hi"}]).status_code == 200


def test_unsupported_image_format(vision):
    buf = io.BytesIO()
    IMAGE.save(buf, format="TIFF")
    url = "data:image/tiff;base64," + base64.b64encode(buf.getvalue()).decode()
    assert_refused(chat(vision, [image_part(url)]), "cannot decode", "PNG")


@pytest.mark.parametrize("path, fragment", [
    ("/missing.png", "HTTP 404"),
    ("/slow.png", "timed out"),
    ("/redirect-file", "non-http(s)"),
], ids=["404", "timeout", "redirect-to-file"])
def test_urls_that_fail(vision, host, path, fragment):
    assert_refused(generate(vision, f"![]({host}{path})"), fragment)


def test_unreachable_and_unsupported_urls(vision):
    from serverkit import free_port

    assert_refused(generate(vision, f"![](http://127.0.0.1:{free_port()}/a.png)"), "failed")
    assert_refused(chat(vision, [image_part("ftp://127.0.0.1/a.png")]), "unsupported image URL")
    assert_refused(chat(vision, [image_part("file:///etc/passwd")]), "unsupported image URL")


def test_image_token_without_an_image(vision):
    assert_refused(generate(vision, "What is <image> here?"), "<image>", "no images")
    image_id = vision.post("/tokenize", json={"inputs": "<image>"}).json()[0]["id"]
    assert_refused(generate_ids(vision, [5, image_id, 6]), "image token")


def generate_ids(client, ids: list[int]) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "tgi", "prompt": ids, "max_tokens": 2})


def test_a_streamed_refusal_is_one_error_event(vision):
    with vision.stream("POST", "/generate_stream", json={
            "inputs": "![](data:image/png;base64,AAAA)", "parameters": {"max_new_tokens": 2}}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    import json
    assert len(lines) == 1
    event = json.loads(lines[0][5:])
    assert event["error_type"] == "validation" and "cannot decode" in event["error"]


def test_huggingface_hub_client_sends_images(vision_server, reference):
    from huggingface_hub import InferenceClient

    client = InferenceClient(vision_server.url)
    out = client.text_generation(f"![]({data_url(IMAGE)})Describe this image.", max_new_tokens=NEW, details=True)
    assert [t.id for t in out.details.tokens] == reference("<image>Describe this image.", [IMAGE])
    reply = client.chat_completion(max_tokens=NEW, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
        {"type": "text", "text": "Describe this image."}]}])
    text = reference.render([{"type": "image"}, {"type": "text", "text": "Describe this image."}])
    assert reply.choices[0].message.content == reference.chat_text(reference(text, [IMAGE]))


def test_idefics2_over_http_matches_transformers(idefics2_server, idefics2_dir):
    """The same routes on another processor (Idefics2: crops of varying sizes, padded and
    masked, fake-token framing): both syntaxes answer what transformers answers."""
    from transformers import AutoProcessor, Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration.from_pretrained(idefics2_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(idefics2_dir)
    eos = processor.tokenizer.eos_token_id

    def greedy(text, images):
        out = processor(text=[text], images=images, return_tensors="pt")
        with torch.inference_mode():
            g = model.generate(**out, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        ids = g[0, out["input_ids"].shape[1]:].tolist()
        return ids[:ids.index(eos) + 1] if eos in ids else ids

    with httpx.Client(base_url=idefics2_server.url, timeout=60) as client:
        got = token_ids(generate(client, f"Look: ![]({data_url(IMAGE)}) and ![]({data_url(OTHER)})?"))
        assert got == greedy("Look: <image> and <image>?", [IMAGE, OTHER])
        resp = chat(client, [image_part(data_url(IMAGE)), {"type": "text", "text": "Describe this image."}])
        assert resp.status_code == 200, resp.text
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Describe this image."}]}], tokenize=False,
            add_generation_prompt=True)
        want = greedy(text, [IMAGE])
        assert resp.json()["choices"][0]["message"]["content"] == processor.tokenizer.decode(
            [t for t in want if t != eos], skip_special_tokens=True)


def test_idefics_v1_over_http_matches_transformers(idefics_server, idefics_dir):
    """Idefics v1 (cross-attention to the images, IdeficsProcessor's interleaved prompt):
    markdown images in `inputs`, chat image_url parts through the tokenizer's template (one
    BOS), streaming, a text-only request, and its refusals, as transformers answers."""
    import json

    from transformers import AutoProcessor, IdeficsForVisionText2Text

    model = IdeficsForVisionText2Text.from_pretrained(idefics_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(idefics_dir)
    tok = processor.tokenizer
    eos = tok.eos_token_id

    def greedy(prompt: list) -> list[int]:
        out = processor(text=prompt, return_tensors="pt")
        with torch.inference_mode():
            g = model.generate(**out, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        ids = g[0, out["input_ids"].shape[1]:].tolist()
        return ids[:ids.index(eos) + 1] if eos in ids else ids

    with httpx.Client(base_url=idefics_server.url, timeout=60) as client:
        want = greedy(["Look:", IMAGE, "and", OTHER, "?"])
        assert token_ids(generate(client, f"Look: ![]({data_url(IMAGE)}) and ![]({data_url(OTHER)})?")) == want
        with client.stream("POST", "/generate_stream", json={
                "inputs": f"![]({data_url(IMAGE)})Describe this image.", "parameters": {"max_new_tokens": NEW}}) as resp:
            events = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]
        assert [e["token"]["id"] for e in events] == greedy([IMAGE, "Describe this image."])
        assert token_ids(generate(client, "Describe this image.")) == greedy(["Describe this image."])

        resp = chat(client, [image_part(data_url(IMAGE)), {"type": "text", "text": "Describe this image."}])
        assert resp.status_code == 200, resp.text
        text = tok.apply_chat_template([{"role": "user", "content": "<image>Describe this image."}],
                                       tokenize=False, add_generation_prompt=True)
        assert text.startswith(tok.bos_token)
        before, after = text[len(tok.bos_token):].split("<image>")
        want = greedy([before, IMAGE, after])  # the processor writes the one BOS
        assert resp.json()["choices"][0]["message"]["content"] == tok.decode(
            [t for t in want if t != eos], skip_special_tokens=True)

        url = data_url(IMAGE)
        assert_refused(generate(client, f"![]({url})![]({url})![]({url})"), "too many images", "limit 2")
        assert_refused(generate(client, "What is <image> here?"), "<image>", "images")
        assert_refused(generate(client, f"![]({url})https://example.com/cat.png"), "would be fetched")
        assert_refused(generate_ids(client, [5, processor.image_token_id, 6]), "image token")
        long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
        assert_refused(generate(client, f"![]({url}){long_text}"), "must have less than 80 tokens")
