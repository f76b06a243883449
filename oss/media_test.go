package oss

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"image"
	"image/color"
	"image/gif"
	"image/jpeg"
	"image/png"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

func testImage(w, h int) image.Image {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			img.Set(x, y, color.NRGBA{uint8(x * 5), uint8(y * 9), 99, 255})
		}
	}
	return img
}

func encodePNG(t testing.TB, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := png.Encode(&b, testImage(w, h)); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func encodeJPEG(t testing.TB, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := jpeg.Encode(&b, testImage(w, h), nil); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func encodeGIF(t testing.TB, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := gif.Encode(&b, testImage(w, h), nil); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// pngHeader is a PNG of w×h with only its signature, IHDR and IEND: the
// header claims the size, no pixel data follows.
func pngHeader(w, h uint32) []byte {
	chunk := func(typ string, data []byte) []byte {
		var c []byte
		c = binary.BigEndian.AppendUint32(c, uint32(len(data)))
		c = append(c, typ...)
		c = append(c, data...)
		return binary.BigEndian.AppendUint32(c, crc32.ChecksumIEEE(append([]byte(typ), data...)))
	}
	ihdr := binary.BigEndian.AppendUint32(nil, w)
	ihdr = binary.BigEndian.AppendUint32(ihdr, h)
	ihdr = append(ihdr, 8, 6, 0, 0, 0) // 8-bit RGBA, deflate, no filter, no interlace
	out := []byte("\x89PNG\r\n\x1a\n")
	out = append(out, chunk("IHDR", ihdr)...)
	return append(out, chunk("IEND", nil)...)
}

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSniff(t *testing.T) {
	pad := func(s string) []byte { return append([]byte(s), make([]byte, 32)...) }
	for _, tc := range []struct {
		head    []byte
		ct, ext string
	}{
		{encodePNG(t, 2, 2), "image/png", "png"},
		{encodeJPEG(t, 2, 2), "image/jpeg", "jpg"},
		{encodeGIF(t, 2, 2), "image/gif", "gif"},
		{readTestdata(t, "lossy-37x23.webp"), "image/webp", "webp"},
		{pad("RIFF\x24\x00\x00\x00WAVEfmt "), "audio/wav", "wav"},
		{pad("\x00\x00\x00\x20ftypisom\x00\x00\x02\x00"), "video/mp4", "mp4"},
		{pad("\x00\x00\x00\x18ftypqt  "), "video/quicktime", "mov"},
		{pad("\x00\x00\x00\x1cftypM4A "), "audio/mp4", "m4a"},
		{pad("\x00\x00\x00\x1cftypavif"), "image/avif", "avif"},
		{pad("\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm"), "video/webm", "webm"},
		{pad("\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska"), "video/x-matroska", "mkv"},
		{pad("ID3\x04\x00\x00\x00\x00\x00\x00"), "audio/mpeg", "mp3"},
		{pad("\xff\xfb\x90\x64"), "audio/mpeg", "mp3"},
		{pad("fLaC\x00\x00\x00\x22"), "audio/flac", "flac"},
		{pad("OggS\x00\x02"), "audio/ogg", "ogg"},
		{pad("glTF\x02\x00\x00\x00"), "model/gltf-binary", "glb"},
		{pad("glTF\x01\x00\x00\x00"), "application/octet-stream", "bin"},
		{pad("\xff\xf1\x50\x80"), "application/octet-stream", "bin"}, // AAC ADTS, not MP3
		{[]byte("just some text pretending to be a png"), "application/octet-stream", "bin"},
		{[]byte("<svg xmlns='http://www.w3.org/2000/svg'/>"), "application/octet-stream", "bin"},
		{nil, "application/octet-stream", "bin"},
		{[]byte("\x89PN"), "application/octet-stream", "bin"},
	} {
		ct, ext := Sniff(tc.head)
		if ct != tc.ct || ext != tc.ext {
			t.Errorf("Sniff(%q) = %s, %s; want %s, %s", tc.head[:min(len(tc.head), 16)], ct, ext, tc.ct, tc.ext)
		}
	}
}

func TestImageInfo(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
		want ImageMeta
	}{
		{"png", encodePNG(t, 37, 23), ImageMeta{"image/png", 37, 23, "png"}},
		{"jpeg", encodeJPEG(t, 41, 19), ImageMeta{"image/jpeg", 41, 19, "jpg"}},
		{"gif", encodeGIF(t, 13, 7), ImageMeta{"image/gif", 13, 7, "gif"}},
		{"webp lossy", readTestdata(t, "lossy-37x23.webp"), ImageMeta{"image/webp", 37, 23, "webp"}},
		{"webp lossless", readTestdata(t, "lossless-41x19.webp"), ImageMeta{"image/webp", 41, 19, "webp"}},
		{"webp extended", readTestdata(t, "alpha-29x31.webp"), ImageMeta{"image/webp", 29, 31, "webp"}},
		{"png header only", pngHeader(20000, 20000), ImageMeta{"image/png", 20000, 20000, "png"}},
	} {
		got, err := ImageInfo(bytes.NewReader(tc.data))
		if err != nil || got != tc.want {
			t.Errorf("%s: %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
	for name, data := range map[string][]byte{
		"text":        []byte("hello, I am a png"),
		"mp4":         []byte("\x00\x00\x00\x20ftypisom\x00\x00\x02\x00 and more bytes here......"),
		"bad crc":     func() []byte { b := pngHeader(10, 10); b[20] ^= 1; return b }(),
		"zero width":  pngHeader(0, 10),
		"truncated":   encodePNG(t, 5, 5)[:20],
		"jpeg no SOF": append([]byte{0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0, 0}, make([]byte, 100)...),
	} {
		if _, err := ImageInfo(bytes.NewReader(data)); !errors.Is(err, schema.ErrUnsupportedMedia) {
			t.Errorf("%s: %v, want ErrUnsupportedMedia", name, err)
		}
	}
}

func TestCheckInputImage(t *testing.T) {
	const maxBytes, maxPixels = 1 << 20, 50_000_000
	for _, tc := range []struct {
		name string
		data []byte
		w, h int
	}{
		{"png", encodePNG(t, 37, 23), 37, 23},
		{"jpeg", encodeJPEG(t, 64, 48), 64, 48},
		{"webp lossy", readTestdata(t, "lossy-37x23.webp"), 37, 23},
		{"webp lossless", readTestdata(t, "lossless-41x19.webp"), 41, 19},
		{"webp extended", readTestdata(t, "alpha-29x31.webp"), 29, 31},
	} {
		meta, err := CheckInputImage(bytes.NewReader(tc.data), maxBytes, maxPixels)
		if err != nil || meta.Width != tc.w || meta.Height != tc.h {
			t.Errorf("%s: %+v, %v", tc.name, meta, err)
		}
	}

	// Not an image, whatever its name says.
	if _, err := CheckInputImage(strings.NewReader("this file is called cat.png but it is text"), maxBytes, maxPixels); !errors.Is(err, schema.ErrUnsupportedMedia) {
		t.Fatalf("text: %v", err)
	}
	// GIF is an image, but not one accepted as input.
	if _, err := CheckInputImage(bytes.NewReader(encodeGIF(t, 4, 4)), maxBytes, maxPixels); !errors.Is(err, schema.ErrUnsupportedMedia) {
		t.Fatalf("gif: %v", err)
	}
	// Too many bytes.
	big := encodePNG(t, 200, 200)
	if _, err := CheckInputImage(bytes.NewReader(big), int64(len(big)-1), maxPixels); !errors.Is(err, schema.ErrTooLarge) {
		t.Fatalf("bytes: %v", err)
	}
	if _, err := CheckInputImage(bytes.NewReader(big), 10, maxPixels); !errors.Is(err, schema.ErrTooLarge) {
		t.Fatalf("bytes below the header size: %v", err)
	}
	if _, err := CheckInputImage(bytes.NewReader(big), int64(len(big)), maxPixels); err != nil {
		t.Fatalf("exactly at the limit: %v", err)
	}
}

// TestCheckInputImagePixelBomb: a 20000×20000 PNG header is refused from the
// header. No pixel data follows it, and decoding 400 megapixels would need
// 1.6 GB; the check allocates next to nothing.
func TestCheckInputImagePixelBomb(t *testing.T) {
	bomb := pngHeader(20000, 20000)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := CheckInputImage(bytes.NewReader(bomb), 32<<20, 50_000_000)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, schema.ErrTooLarge) || !strings.Contains(err.Error(), "20000x20000") {
		t.Fatalf("got %v", err)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Fatalf("checking the header allocated %d bytes", grew)
	}
	// The same for JPEG: a frame header claiming 30000×30000.
	jpg := encodeJPEG(t, 8, 8)
	i := bytes.Index(jpg, []byte{0xFF, 0xC0})
	if i < 0 {
		t.Fatal("no SOF0 marker")
	}
	binary.BigEndian.PutUint16(jpg[i+5:], 30000)
	binary.BigEndian.PutUint16(jpg[i+7:], 30000)
	if _, err := CheckInputImage(bytes.NewReader(jpg), 32<<20, 50_000_000); !errors.Is(err, schema.ErrTooLarge) || !strings.Contains(err.Error(), "30000x30000") {
		t.Fatalf("jpeg: %v", err)
	}
}

func TestObjectKeyAndSafeExt(t *testing.T) {
	at := time.Date(2026, 1, 2, 23, 30, 0, 0, time.FixedZone("UTC+8", 8*3600))
	key := ObjectKey("style", at, "01JH8Z4Q6W3V9XK2M5N7P0R1ST", 3, ".PNG")
	if key != "style/2026/01/02/01JH8Z4Q6W3V9XK2M5N7P0R1ST/3.png" {
		t.Fatalf("key %s", key)
	}
	if err := ValidKey(key); err != nil {
		t.Fatal(err)
	}
	if k := ObjectKey("logo", at, "j", 0, "../../etc"); k != "logo/2026/01/02/j/0.bin" {
		t.Fatalf("hostile ext: %s", k)
	}
	for in, want := range map[string]string{
		"png": "png", ".JPG": "jpg", "webm": "webm", "": "bin", ".": "bin", "a/b": "bin", "toolongext": "bin",
		"p n g": "bin", "ü": "bin", "mp4\x00": "bin", "../x": "bin", "gltf2": "gltf2",
	} {
		if got := SafeExt(in); got != want {
			t.Errorf("SafeExt(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestValidKey(t *testing.T) {
	for _, key := range badKeys {
		var ve *schema.ValidationError
		if err := ValidKey(key); !errors.As(err, &ve) || ve.Field != "key" {
			t.Errorf("ValidKey(%q) = %v", key, err)
		}
	}
	for _, key := range []string{
		"a", "a.png", "style/2026/01/02/job/0.png", "a b/c+d/ü 日本.png", "x..y", "a/b.", "100%/&=?#",
		strings.Repeat("abcdefg/", 127) + "abcdefg", strings.Repeat("s", 255),
	} {
		if err := ValidKey(key); err != nil {
			t.Errorf("ValidKey(%q) = %v", key, err)
		}
	}
}
