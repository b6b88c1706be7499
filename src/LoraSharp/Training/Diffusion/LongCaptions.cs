using LoraSharp.Text;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// kohya's <c>max_token_length</c> (150 or 225): a caption is tokenized to BOS + up to that many tokens + EOS, padded,
/// and cut into 75-token chunks that each get their own BOS and last token (77 ids per chunk, all chunks encoded as
/// one batch); the hidden states are joined back as BOS, each chunk's 75 inner states, and the last chunk's final state
/// — 2 + 75·n positions. With a padding token other than EOS (SD 2.x, SDXL's second encoder) a chunk whose last text
/// token is cut off ends in EOS, and an empty chunk reads BOS EOS PAD….
/// </summary>
public static class LongCaptions
{
    /// <summary>Chunks of a long caption: [n, 77] ids (n = maxTokenLength / 75).</summary>
    public static int[][] ChunkIds(ClipTokenizer tok, string text, int maxTokenLength)
    {
        int inner = tok.MaxLength - 2;
        if (maxTokenLength % inner != 0 || maxTokenLength < inner) throw new ArgumentOutOfRangeException(nameof(maxTokenLength), maxTokenLength, $"must be a multiple of {inner}");
        var tokens = tok.EncodeTokens(text);
        int keep = Math.Min(tokens.Length, maxTokenLength);
        var seq = new int[maxTokenLength + 2];
        seq[0] = tok.BosId;
        Array.Copy(tokens, 0, seq, 1, keep);
        seq[keep + 1] = tok.EosId;
        for (int i = keep + 2; i < seq.Length; i++) seq[i] = tok.PadId;
        var chunks = new List<int[]>();
        for (int start = 1; start < seq.Length - 1; start += inner)
        {
            var chunk = new int[tok.MaxLength];
            chunk[0] = seq[0];
            Array.Copy(seq, start, chunk, 1, inner);
            chunk[^1] = seq[^1];
            if (tok.PadId != tok.EosId)
            {
                if (chunk[^2] != tok.EosId && chunk[^2] != tok.PadId) chunk[^1] = tok.EosId;
                if (chunk[1] == tok.PadId) chunk[1] = tok.EosId;
            }
            chunks.Add(chunk);
        }
        return chunks.ToArray();
    }

    /// <summary>The ids of a batch of captions as [B·n, 77] (caption-major).</summary>
    public static Tensor BatchIds(ClipTokenizer tok, IReadOnlyList<string> texts, int maxTokenLength, Device device) =>
        tensor(texts.SelectMany(t => ChunkIds(tok, t, maxTokenLength).SelectMany(c => c.Select(i => (long)i))).ToArray(), dtype: ScalarType.Int64, device: device)
            .reshape(-1, tok.MaxLength);

    /// <summary>Hidden states [B·n, 77, C] of the chunks → [B, 2 + 75·n, C] (BOS, each chunk's inner states, the last state).</summary>
    public static Tensor Merge(Tensor states, int batch)
    {
        using var scope = NewDisposeScope();
        long len = states.shape[1], channels = states.shape[2];
        var joined = states.reshape(batch, -1, channels);
        long total = joined.shape[1];
        var parts = new List<Tensor> { joined[.., ..1] };
        for (long start = 1; start < total; start += len) parts.Add(joined[.., (int)start..(int)(start + len - 2)]);
        parts.Add(joined[.., ^1..]);
        return cat(parts, 1).MoveToOuterDisposeScope();
    }
}
