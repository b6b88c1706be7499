namespace LoraSharp.Text;

/// <summary>One text-encoder input: 77 ids (BOS, 75 tokens or padding, EOS) and a weight per position.</summary>
public sealed record PromptChunk(int[] Tokens, float[] Multipliers);

/// <summary>A prompt as text-encoder chunks; <see cref="TokenCount"/> counts prompt tokens as A1111 shows them.</summary>
public sealed record TokenizedPrompt(IReadOnlyList<PromptChunk> Chunks, int TokenCount)
{
    /// <summary>All chunks' ids concatenated ([chunks·77]).</summary>
    public int[] AllTokens() => Chunks.SelectMany(c => c.Tokens).ToArray();

    /// <summary>All chunks' weights concatenated ([chunks·77]), the input of <see cref="PromptEmphasis.Apply(TorchSharp.torch.Tensor, float[], EmphasisMode)"/>.</summary>
    public float[] AllMultipliers() => Chunks.SelectMany(c => c.Multipliers).ToArray();
}

/// <summary>
/// A1111's long-prompt handling (modules/sd_hijack_clip.py, tokenize_line): each fragment is tokenized on its own,
/// tokens fill 75-token chunks, each chunk becomes BOS + 75 + EOS with end-of-text padding, and the emphasis weight of
/// every token rides along (1.0 for BOS/EOS/padding). BREAK closes the current chunk. When a chunk is full and a comma
/// occurred within the last <c>commaPaddingBacktrack</c> tokens, the tokens after that comma move to the next chunk.
/// The text encoder runs once per chunk; the outputs are concatenated along the sequence.
/// </summary>
public static class PromptChunker
{
    public const int ChunkLength = 75;
    public const int DefaultCommaPaddingBacktrack = 20;

    public static TokenizedPrompt Tokenize(ClipTokenizer tokenizer, string prompt, int commaPaddingBacktrack = DefaultCommaPaddingBacktrack) =>
        Tokenize(tokenizer, PromptParser.Parse(prompt).Fragments, commaPaddingBacktrack);

    public static TokenizedPrompt Tokenize(ClipTokenizer tokenizer, IReadOnlyList<PromptFragment> fragments, int commaPaddingBacktrack = DefaultCommaPaddingBacktrack)
    {
        int chunkLength = tokenizer.MaxLength - 2;
        int comma = tokenizer.CommaId;
        var chunks = new List<PromptChunk>();
        var tokens = new List<int>();
        var mults = new List<float>();
        int tokenCount = 0;
        int lastComma = -1;

        void NextChunk(bool isLast = false)
        {
            tokenCount += isLast ? tokens.Count : chunkLength;
            int toAdd = chunkLength - tokens.Count;
            for (int k = 0; k < toAdd; k++)
            {
                tokens.Add(tokenizer.PadId);
                mults.Add(1f);
            }
            chunks.Add(new PromptChunk([tokenizer.BosId, .. tokens, tokenizer.EosId], [1f, .. mults, 1f]));
            tokens = [];
            mults = [];
            lastComma = -1;
        }

        foreach (var fragment in fragments)
        {
            if (fragment.IsBreak)
            {
                NextChunk();
                continue;
            }
            float weight = (float)fragment.Weight;
            foreach (var token in tokenizer.EncodeTokens(fragment.Text))
            {
                if (token == comma)
                {
                    lastComma = tokens.Count;
                }
                else if (commaPaddingBacktrack != 0 && tokens.Count == chunkLength && lastComma != -1 && tokens.Count - lastComma <= commaPaddingBacktrack)
                {
                    int breakAt = lastComma + 1;
                    var relocTokens = tokens.GetRange(breakAt, tokens.Count - breakAt);
                    var relocMults = mults.GetRange(breakAt, mults.Count - breakAt);
                    tokens.RemoveRange(breakAt, tokens.Count - breakAt);
                    mults.RemoveRange(breakAt, mults.Count - breakAt);
                    NextChunk();
                    tokens = relocTokens;
                    mults = relocMults;
                }
                if (tokens.Count == chunkLength)
                    NextChunk();
                tokens.Add(token);
                mults.Add(weight);
            }
        }
        if (tokens.Count > 0 || chunks.Count == 0)
            NextChunk(isLast: true);
        return new TokenizedPrompt(chunks, tokenCount);
    }

    /// <summary>An empty chunk (BOS, EOS, padding; weights 1), what A1111 appends to the shorter of cond/uncond.</summary>
    public static PromptChunk EmptyChunk(ClipTokenizer tokenizer)
    {
        var ids = new int[tokenizer.MaxLength];
        Array.Fill(ids, tokenizer.PadId);
        ids[0] = tokenizer.BosId;
        ids[1] = tokenizer.EosId;
        var mults = new float[tokenizer.MaxLength];
        Array.Fill(mults, 1f);
        return new PromptChunk(ids, mults);
    }

    /// <summary>Pads every prompt with empty chunks to the largest chunk count (cond and uncond must have equal length).</summary>
    public static IReadOnlyList<TokenizedPrompt> PadToSameLength(ClipTokenizer tokenizer, params IReadOnlyList<TokenizedPrompt> prompts)
    {
        int max = prompts.Count == 0 ? 0 : prompts.Max(p => p.Chunks.Count);
        return prompts.Select(p => p.Chunks.Count == max ? p
            : p with { Chunks = [.. p.Chunks, .. Enumerable.Range(0, max - p.Chunks.Count).Select(_ => EmptyChunk(tokenizer))] }).ToList();
    }
}
