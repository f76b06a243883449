package comfy

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
)

// Binary frame kinds (the first big-endian uint32 of every binary frame).
const (
	BinaryPreviewImage             uint32 = 1
	BinaryText                     uint32 = 3
	BinaryPreviewImageWithMetadata uint32 = 4
)

// Preview image formats (the second word of a kind-1 frame).
const (
	PreviewFormatJPEG uint32 = 1
	PreviewFormatPNG  uint32 = 2
)

// DecodeBinary decodes one binary frame. Byte slices in the result alias b.
//
//	kind 1: u32 format (1 JPEG, 2 PNG) | image
//	kind 3: u32 L | L bytes node id | text
//	kind 4: u32 M | M bytes metadata JSON | image
//
// Other kinds come back as *UnknownBinary.
func DecodeBinary(b []byte) (Event, error) {
	if len(b) < 4 {
		return nil, fmt.Errorf("comfy: binary frame of %d bytes", len(b))
	}
	kind := binary.BigEndian.Uint32(b)
	rest := b[4:]
	switch kind {
	case BinaryPreviewImage:
		if len(rest) < 4 {
			return nil, errors.New("comfy: preview frame without format word")
		}
		format := binary.BigEndian.Uint32(rest)
		ct := ""
		switch format {
		case PreviewFormatJPEG:
			ct = "image/jpeg"
		case PreviewFormatPNG:
			ct = "image/png"
		}
		return &Preview{Kind: kind, Format: format, ContentType: ct, Image: rest[4:]}, nil
	case BinaryText:
		id, text, err := lengthPrefixed(rest)
		if err != nil {
			return nil, fmt.Errorf("comfy: text frame: %w", err)
		}
		return &Text{NodeID: string(id), Text: string(text)}, nil
	case BinaryPreviewImageWithMetadata:
		meta, img, err := lengthPrefixed(rest)
		if err != nil {
			return nil, fmt.Errorf("comfy: preview-with-metadata frame: %w", err)
		}
		var w struct {
			NodeID        lenientString `json:"node_id"`
			PromptID      lenientString `json:"prompt_id"`
			DisplayNodeID lenientString `json:"display_node_id"`
			ParentNodeID  lenientString `json:"parent_node_id"`
			RealNodeID    lenientString `json:"real_node_id"`
			ImageType     lenientString `json:"image_type"`
		}
		if err := json.Unmarshal(meta, &w); err != nil {
			return nil, fmt.Errorf("comfy: preview metadata: %w", err)
		}
		pm := &PreviewMeta{
			NodeID: string(w.NodeID), PromptID: string(w.PromptID), DisplayNodeID: string(w.DisplayNodeID),
			ParentNodeID: string(w.ParentNodeID), RealNodeID: string(w.RealNodeID), ImageType: string(w.ImageType),
		}
		return &Preview{Kind: kind, ContentType: pm.ImageType, Image: img, Meta: pm}, nil
	}
	return &UnknownBinary{Kind: kind, Data: rest}, nil
}

// lengthPrefixed splits u32 L | L bytes | rest.
func lengthPrefixed(b []byte) (head, tail []byte, err error) {
	if len(b) < 4 {
		return nil, nil, errors.New("no length word")
	}
	n := uint64(binary.BigEndian.Uint32(b))
	if n > uint64(len(b)-4) {
		return nil, nil, fmt.Errorf("length %d exceeds frame (%d bytes left)", n, len(b)-4)
	}
	return b[4 : 4+n], b[4+n:], nil
}

// EncodePreview builds a kind-1 frame (for fakes and tests).
func EncodePreview(format uint32, image []byte) []byte {
	out := make([]byte, 8, 8+len(image))
	binary.BigEndian.PutUint32(out, BinaryPreviewImage)
	binary.BigEndian.PutUint32(out[4:], format)
	return append(out, image...)
}

// EncodeText builds a kind-3 frame.
func EncodeText(nodeID, text string) []byte {
	out := make([]byte, 8, 8+len(nodeID)+len(text))
	binary.BigEndian.PutUint32(out, BinaryText)
	binary.BigEndian.PutUint32(out[4:], uint32(len(nodeID)))
	out = append(out, nodeID...)
	return append(out, text...)
}

// EncodePreviewWithMetadata builds a kind-4 frame from metadata JSON and image bytes.
func EncodePreviewWithMetadata(meta []byte, image []byte) []byte {
	out := make([]byte, 8, 8+len(meta)+len(image))
	binary.BigEndian.PutUint32(out, BinaryPreviewImageWithMetadata)
	binary.BigEndian.PutUint32(out[4:], uint32(len(meta)))
	out = append(out, meta...)
	return append(out, image...)
}
