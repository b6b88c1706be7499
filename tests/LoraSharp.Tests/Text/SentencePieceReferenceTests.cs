using System.Security.Cryptography;
using System.Text.Json;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;

namespace LoraSharp.Tests.Text;

/// <summary>Both reference .model files against sentencepiece 0.2.0's own output (tokenizer_vectors.json), sample by sample.</summary>
public class SentencePieceReferenceTests
{
    static readonly string LlmRoot = ReferenceData.PathOf("llm");

    static readonly JsonElement Manifest = JsonDocument.Parse(File.ReadAllText(Path.Combine(LlmRoot, "manifest.json"))).RootElement;

    static readonly Dictionary<string, SentencePieceTokenizer> Tokenizers = new();

    static SentencePieceTokenizer TokenizerFor(string model)
    {
        lock (Tokenizers)
        {
            if (!Tokenizers.TryGetValue(model, out var t))
                Tokenizers[model] = t = SentencePieceTokenizer.Load(Path.Combine(LlmRoot, model));
            return t;
        }
    }

    static IEnumerable<(string Model, JsonElement Entry)> Entries()
    {
        foreach (var tok in Manifest.GetProperty("tokenizers").EnumerateArray())
        {
            var vectors = JsonDocument.Parse(File.ReadAllText(Path.Combine(LlmRoot, tok.GetProperty("vectors").GetString()!))).RootElement;
            yield return (tok.GetProperty("model").GetString()!, vectors.GetProperty("tokenizers").GetProperty(tok.GetProperty("entry").GetString()!));
        }
    }

    /// <summary>(model file, sample index) for every sample of every tokenizer in the manifest.</summary>
    public static TheoryData<string, int> Samples()
    {
        var data = new TheoryData<string, int>();
        foreach (var (model, entry) in Entries())
            for (int i = 0; i < entry.GetProperty("samples").GetArrayLength(); i++)
                data.Add(model, i);
        return data;
    }

    public static TheoryData<string> Models()
    {
        var data = new TheoryData<string>();
        foreach (var (model, _) in Entries()) data.Add(model);
        return data;
    }

    static JsonElement Entry(string model) => Entries().First(e => e.Model == model).Entry;

    static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();

    [Theory]
    [MemberData(nameof(Samples))]
    public void Sample_encodes_to_reference_ids_and_decodes_to_reference_text(string model, int index)
    {
        var sample = Entry(model).GetProperty("samples")[index];
        var tokenizer = TokenizerFor(model);
        var text = sample.GetProperty("text").GetString()!;
        Assert.Equal(Ints(sample.GetProperty("ids")), tokenizer.Encode(text));
        Assert.Equal(Ints(sample.GetProperty("ids_with_bos_eos")), tokenizer.Encode(text, addBos: true, addEos: true));
        Assert.Equal(sample.GetProperty("decoded").GetString(), tokenizer.Decode(Ints(sample.GetProperty("ids"))));
        Assert.Equal(sample.GetProperty("decoded").GetString(), tokenizer.Decode(Ints(sample.GetProperty("ids_with_bos_eos"))));
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void Model_file_vocabulary_and_special_ids_match_reference(string model)
    {
        var entry = Entry(model);
        Assert.Equal(entry.GetProperty("sha256").GetString(), Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(Path.Combine(LlmRoot, model)))));
        var tokenizer = TokenizerFor(model);
        Assert.Equal(entry.GetProperty("vocab_size").GetInt32(), tokenizer.VocabSize);
        Assert.Equal(entry.GetProperty("bos_id").GetInt32(), tokenizer.BosId);
        Assert.Equal(entry.GetProperty("eos_id").GetInt32(), tokenizer.EosId);
        Assert.Null(tokenizer.PadId);
        foreach (var v in entry.GetProperty("vocab").EnumerateArray())
        {
            var piece = tokenizer.Model.Pieces[v.GetProperty("id").GetInt32()];
            Assert.Equal(v.GetProperty("piece").GetString(), piece.Piece);
            Assert.Equal(v.GetProperty("score").GetSingle(), piece.Score);
            Assert.Equal(v.GetProperty("type").GetString(), piece.Type.ToString().ToLowerInvariant() is "userdefined" ? "user_defined" : piece.Type.ToString().ToLowerInvariant());
        }
    }

    [Fact]
    public void Special_token_strings_are_recognized_only_when_asked()
    {
        var tokenizer = TokenizerFor("model/tokenizer.model");
        var withSpecials = tokenizer.EncodeWithSpecialTokens("<s>Hello</s>");
        Assert.Equal(1, withSpecials[0]);
        Assert.Equal(2, withSpecials[^1]);
        Assert.Equal(tokenizer.Encode("Hello"), withSpecials.Skip(1).SkipLast(1));
        Assert.DoesNotContain(1, tokenizer.Encode("<s>Hello</s>"));
        Assert.Equal("<s>Hello</s>", tokenizer.Decode(withSpecials, skipSpecialTokens: false));
        Assert.Equal("Hello", tokenizer.Decode(withSpecials));
    }

    [Fact]
    public void Garbage_model_file_is_a_clear_error()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir.File("bad.model"), [0xff, 0xff, 0xff, 0x01]);
        var e = Assert.Throws<LoraSharpException>(() => SentencePieceTokenizer.Load(dir.File("bad.model")));
        Assert.Contains("bad.model", e.Message);
    }
}
