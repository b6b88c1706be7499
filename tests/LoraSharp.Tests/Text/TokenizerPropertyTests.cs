using CsCheck;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;

namespace LoraSharp.Tests.Text;

/// <summary>Round-trip properties over random text mixing ASCII, whitespace, accents, CJK and emoji.</summary>
public class TokenizerPropertyTests
{
    static readonly string[] Pieces = ["a", "Z", "the", " ", "  ", "\t", "\n", "é", "ß", "Ω", "∑", "日本", "😀", "🚀", "0", "42", "3.14", ".", ",", "\"", "'s", "<s>"];
    // Not "▁" (U+2581): SentencePiece itself reads it as the space marker, so it decodes as " ".

    static readonly Gen<string> Text = Gen.Int[0, Pieces.Length - 1].Array[0, 30].Select(ix => string.Concat(ix.Select(i => Pieces[i])));

    [Fact]
    public void Byte_fallback_sentencepiece_round_trips_any_text()
    {
        var tok = SentencePieceTokenizer.Load(ReferenceData.PathOf("llm", "tokenizer", "tokenizer_bytefallback.model"));
        Text.Sample(text => tok.Decode(tok.Encode(text)) == text, iter: 300);
    }

    [Fact]
    public void Sentencepiece_without_byte_fallback_never_emits_two_unknowns_in_a_row()
    {
        var tok = SentencePieceTokenizer.Load(ReferenceData.PathOf("llm", "model", "tokenizer.model"));
        Text.Sample(text =>
        {
            var ids = tok.Encode(text);
            return !ids.Zip(ids.Skip(1)).Any(p => p.First == 0 && p.Second == 0);
        }, iter: 300);
    }
}
