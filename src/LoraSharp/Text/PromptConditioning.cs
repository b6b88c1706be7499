using static TorchSharp.torch;

namespace LoraSharp.Text;

/// <summary>
/// Text conditioning the A1111 way, independent of the encoder model: prompts are chunked (<see cref="PromptChunker"/>),
/// padded to the same number of chunks, each chunk position is encoded for the whole batch at once, emphasis is
/// applied per chunk batch (<see cref="PromptEmphasis"/>), and the chunks are concatenated along the sequence.
/// </summary>
public static class PromptConditioning
{
    /// <summary>
    /// Encodes already tokenized prompts. <paramref name="encoder"/> maps ids [B, 77] (int64, on <paramref name="device"/>)
    /// to hidden states [B, 77, C] (e.g. CLIP's last or penultimate layer after the final LayerNorm).
    /// Returns [B, chunks·77, C].
    /// </summary>
    public static Tensor Encode(ClipTokenizer tokenizer, IReadOnlyList<TokenizedPrompt> prompts, Func<Tensor, Tensor> encoder, Device device, EmphasisMode mode = EmphasisMode.Original)
    {
        if (prompts.Count == 0) throw new ArgumentException("no prompts", nameof(prompts));
        var padded = PromptChunker.PadToSameLength(tokenizer, prompts);
        int chunkCount = padded[0].Chunks.Count;
        int length = tokenizer.MaxLength;
        using var scope = NewDisposeScope();
        var outputs = new List<Tensor>(chunkCount);
        for (int c = 0; c < chunkCount; c++)
        {
            var ids = new long[padded.Count * length];
            var weights = new float[padded.Count * length];
            for (int b = 0; b < padded.Count; b++)
            {
                var chunk = padded[b].Chunks[c];
                for (int k = 0; k < length; k++)
                {
                    ids[b * length + k] = chunk.Tokens[k];
                    weights[b * length + k] = chunk.Multipliers[k];
                }
            }
            var idTensor = tensor(ids, dtype: ScalarType.Int64, device: device).reshape(padded.Count, length);
            var hidden = encoder(idTensor);
            if (hidden.dim() != 3 || hidden.shape[0] != padded.Count || hidden.shape[1] != length)
                throw new InvalidOperationException($"the text encoder returned [{string.Join(", ", hidden.shape)}], expected [{padded.Count}, {length}, C]");
            outputs.Add(PromptEmphasis.Apply(hidden, weights, mode));
        }
        return cat(outputs, 1).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Parses and encodes prompts (extra-network tags are removed from the text; their LoRA requests are in the
    /// returned <see cref="ParsedPrompt"/>s, which the caller applies before calling the encoder).
    /// </summary>
    public static (Tensor Hidden, IReadOnlyList<ParsedPrompt> Parsed) Encode(ClipTokenizer tokenizer, IReadOnlyList<string> prompts, Func<Tensor, Tensor> encoder, Device device,
        EmphasisMode mode = EmphasisMode.Original, int commaPaddingBacktrack = PromptChunker.DefaultCommaPaddingBacktrack)
    {
        var parsed = prompts.Select(p => PromptParser.Parse(p, parseEmphasis: mode != EmphasisMode.None)).ToList();
        var tokenized = parsed.Select(p => PromptChunker.Tokenize(tokenizer, p.Fragments, commaPaddingBacktrack)).ToList();
        return (Encode(tokenizer, tokenized, encoder, device, mode), parsed);
    }
}
